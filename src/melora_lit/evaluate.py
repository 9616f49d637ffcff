"""``melora-lit evaluate``: score a checkpoint's adapted model on lm-evaluation-harness tasks.

The checkpoint's model is rebuilt (backbone from its source, adapter from the checkpoint, as
``export`` does), its MELoRA updates merged into the weights (unless ``--no_merge``), and handed
to lm-eval's Hugging Face model wrapper (``lm_eval.models.huggingface.HFLM``) with the run's
tokenizer (and the named chat template of the run's data, if it used one). The results JSON that
``lm_eval.simple_evaluate`` returns is written next to the run: ``RUN/lm_eval/results_CKPT.json``
(or ``--output_path``, a ``.json`` file), whole or not at all; an existing one is replaced only with
``--overwrite``, and never one that is an input, a checkpoint or in another run's folder.

Tasks are lm-eval task names (``hellaswag``, ``arc_easy``: these download their data) or names
of task YAMLs in ``--include_path`` folders (a YAML can read a local JSON file with
``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}``, which needs no network).
Needs the ``eval`` extra: ``pip install 'melora-lit[eval]'``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from .errors import OneLineArgumentParser
from .run import check_output, check_protected, remove_stale_temp_files, staged

__all__ = ["evaluate_checkpoint", "evaluate_main"]


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(prog="melora-lit evaluate",
                       description="Score a melora-lit checkpoint on lm-evaluation-harness tasks.")
    p.add_argument("--ckpt_path", required=True, help="checkpoint of a fit run (e.g. RUN/checkpoints/last.ckpt)")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--config", default=None,
                   help="the run's config.yaml; its model settings are used where the checkpoint has none")
    p.add_argument("--include_path", action="append", default=None,
                   help="a folder of task YAMLs to add to lm-eval's own (repeatable)")
    p.add_argument("--num_fewshot", type=int, default=None, help="few-shot examples per prompt (default: the task's)")
    p.add_argument("--limit", type=float, default=None,
                   help="score only this many examples per task (or this fraction, if below 1)")
    p.add_argument("--batch_size", type=int, default=8, help="lm-eval batch size")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--apply_chat_template", action="store_true", help="wrap prompts in the chat template")
    p.add_argument("--no_merge", action="store_true",
                   help="evaluate with the adapter layers as they are instead of merged into the weights")
    p.add_argument("--output_path", default=None,
                   help="results JSON file (default: RUN/lm_eval/results_CKPT.json next to the checkpoint's run)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing results file")
    return p


def _run_of(ckpt_path: str) -> Path:
    ckpt = Path(ckpt_path)
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def _default_output(ckpt_path: str) -> Path:
    return _run_of(ckpt_path) / "lm_eval" / f"results_{Path(ckpt_path).stem}.json"


def _run_chat_template(config: str | None) -> str | None:
    """The named or Jinja chat template the run's data module set, if any."""
    if config is None:
        return None
    import yaml

    try:
        data = (yaml.safe_load(Path(config).read_text()) or {}).get("data") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return None
    template = (data.get("init_args", data) or {}).get("chat_template") if isinstance(data, dict) else None
    if template is None:
        return None
    from .data.chat import CHAT_TEMPLATES

    return CHAT_TEMPLATES.get(template, template)


def evaluate_checkpoint(
    ckpt_path: str,
    tasks: list[str],
    config: str | None = None,
    include_path: list[str] | None = None,
    num_fewshot: int | None = None,
    limit: float | None = None,
    batch_size: int = 8,
    device: str | None = None,
    apply_chat_template: bool = False,
    merge: bool = True,
    output_path: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run lm-eval on the checkpoint's adapted model; returns its results dict (also written as
    JSON to ``output_path``, by default next to the run; an existing file only with ``overwrite``)."""
    out, run = Path(output_path) if output_path else _default_output(ckpt_path), _run_of(ckpt_path)
    # before anything is read: the checkpoint's own run may hold its results (the default), no other run
    check_output(out, "output_path", overwrite, suffixes=(".json",), current=run,
                 inputs=[("--ckpt_path", ckpt_path), ("--config", config),
                         *(("--include_path", folder) for folder in include_path or [])])
    from .training.checkpoints import read_checkpoint

    recorded = (read_checkpoint(ckpt_path).get("hyper_parameters") or {}).get("model_name_or_path")
    check_protected(out, "output_path", [("model_name_or_path recorded in the checkpoint", recorded)], run)
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
        from lm_eval.utils import handle_non_serializable, make_table
    except ImportError:
        raise ValueError("melora-lit evaluate needs lm-eval: pip install 'melora-lit[eval]'") from None
    import torch
    from transformers import AutoTokenizer

    from .adapter import merge_melora
    from .export import load_checkpoint_model
    from .sources import resolve_pretrained

    tasks = [t.strip() for t in tasks if t.strip()]
    if not tasks:
        raise ValueError("evaluate: --tasks names no task")
    for folder in include_path or []:
        if not Path(folder).is_dir():
            raise ValueError(f"evaluate: --include_path {folder} is not a folder")
    if limit is not None and limit <= 0:
        raise ValueError(f"evaluate: --limit={limit} is not valid; use a count >= 1 or a fraction in (0, 1)")
    # lm-eval's own thousands of task files take a while to index: only when a task needs them
    manager = TaskManager(include_path=include_path, include_defaults=False) if include_path else None
    if manager is None or any(t not in manager.all_tasks for t in tasks):
        manager = TaskManager(include_path=include_path or None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {', '.join(include_path)}" if include_path else ""
        raise ValueError(f"evaluate: unknown task(s) {', '.join(unknown)}: not an lm-eval task{where}")
    if limit is not None and limit >= 1:
        limit = int(limit)  # lm-eval reads a float as a fraction

    module = load_checkpoint_model(ckpt_path, config)
    hp = module.hparams
    if not module.task.lm_eval:
        raise ValueError(f"evaluate: {ckpt_path} is a {hp.task} checkpoint; lm-eval scores causal LMs")
    model = module.model
    if merge:
        merge_melora(model)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(resolve_pretrained(hp.model_name_or_path, hp.get("gguf_file")))
    template = _run_chat_template(config)
    if template is not None:
        tokenizer.chat_template = template
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, apply_chat_template=apply_chat_template,
                                      log_samples=False)
    results["config"]["melora_lit"] = {"ckpt_path": str(ckpt_path), "merged": merge,
                                       "model_name_or_path": hp.model_name_or_path}
    remove_stale_temp_files(out.parent)  # what a killed evaluate left
    with staged(out, "w", encoding="utf-8") as f:
        f.write(json.dumps(results, indent=2, default=handle_non_serializable))
    print(make_table(results))
    print(f"melora-lit: wrote lm-eval results to {out}")
    return results


def evaluate_main(args: Sequence[str]) -> dict[str, Any]:
    """``melora-lit evaluate ...`` (args after ``evaluate``)."""
    opts = _parser().parse_args(list(args))
    return evaluate_checkpoint(opts.ckpt_path, opts.tasks.split(","), opts.config, opts.include_path,
                               opts.num_fewshot, opts.limit, opts.batch_size, opts.device,
                               opts.apply_chat_template, not opts.no_merge, opts.output_path, opts.overwrite)
