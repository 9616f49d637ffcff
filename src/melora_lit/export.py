"""``melora-lit export``: turn a training checkpoint into files that other tools load.

* ``merged``: the backbone with every MELoRA update folded into its weights, saved as a plain
  transformers folder (config, safetensors, tokenizer): ``AutoModelFor...from_pretrained`` loads
  it without melora_lit and gives the adapted model's outputs.
* ``adapter``: the melora_lit adapter folder (:func:`~melora_lit.adapter.io.save_adapter`).
* ``peft``: the adapter as a standard PEFT LoRA adapter of rank n·r
  (:func:`~melora_lit.adapter.io.export_peft_lora`).

Each folder gets a model card, ``README.md`` (:func:`write_model_card`).

Works for classifiers and causal LMs alike: the checkpoint's hyper-parameters rebuild the model
(its backbone from its source), then the checkpoint's adapter is loaded into it.
"""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .errors import ModelSourceError, OneLineArgumentParser, first_line
from .run import check_output, check_protected, remove_stale_temp_files, staged_folder
from .sources import BaseDescription

if TYPE_CHECKING:
    from .training.tasks import Task

FORMATS = ("merged", "adapter", "peft")

__all__ = ["FORMATS", "export_checkpoint", "export_main", "load_checkpoint_model", "write_model_card"]


def _parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="melora-lit export",
        description="Export a melora-lit checkpoint as a merged transformers model, a melora_lit adapter "
                    "folder and/or a PEFT LoRA adapter. Classifiers and causal LMs alike.",
    )
    p.add_argument("--ckpt_path", required=True, help="checkpoint of a fit run (e.g. RUN/checkpoints/last.ckpt)")
    p.add_argument("--output_dir", required=True,
                   help="where to write; with --format all, subfolders merged/, adapter/ and peft/")
    p.add_argument("--format", default="all", choices=[*FORMATS, "all"], help="what to write (default: all)")
    p.add_argument("--config", default=None,
                   help="the run's config.yaml; its model settings are used where the checkpoint has none")
    p.add_argument("--model_name_or_path", default=None,
                   help="load the backbone from here instead of the source recorded in the checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder (whole)")
    return p


def _model_settings(ckpt: dict, ckpt_path: str, config: str | None, model_name_or_path: str | None) -> dict[str, Any]:
    from .adapter import MELoRAConfig
    from .training.checkpoints import refuse_code_settings
    from .training.module import MELoRAModule

    hparams = dict(ckpt.get("hyper_parameters") or {})
    if "melora" not in ckpt or "model_name_or_path" not in hparams:
        raise ValueError(f"{ckpt_path} is not a melora-lit checkpoint (no adapter metadata or hyper-parameters)")
    settings: dict[str, Any] = {}
    typed: dict[str, Any] = {}  # what the user's config and command line say
    if config is not None:
        import yaml

        path = Path(config)
        if not path.is_file():
            raise ValueError(f"config file not found: {config}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"cannot read {config}: {first_line(err)}") from None
        model = (data or {}).get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict):
            raise ValueError(f"{config} has no model section")
        typed.update(model.get("init_args", model))
        settings.update(typed)
    # The checkpoint's hyper-parameters win where they decide what the checkpoint holds; settings
    # that run or import code come from the user only (a checkpoint is data)
    settings.update(hparams)
    if model_name_or_path is not None:
        settings["model_name_or_path"] = typed["model_name_or_path"] = model_name_or_path
    refuse_code_settings(ckpt_path, settings, typed, trust_option="a --config whose model section sets "
                         "trust_remote_code: true", source_option="--model_name_or_path")
    known = set(inspect.signature(MELoRAModule.__init__).parameters) - {"self", "generation"}
    settings = {k: v for k, v in settings.items() if k in known}
    if isinstance(settings.get("melora"), dict):
        settings["melora"] = MELoRAConfig(**settings["melora"])
    return settings


def load_checkpoint_model(ckpt_path: str, config: str | None = None, model_name_or_path: str | None = None,
                          command: str | None = None):
    """The :class:`~melora_lit.training.module.MELoRAModule` of a checkpoint, backbone loaded from its
    source and adapter from the checkpoint, in eval mode (read and checked as every reader does:
    :mod:`melora_lit.training.checkpoints`). ``command``: the one that has ``--model_name_or_path``,
    named in the error when the recorded backbone cannot be loaded."""
    from .training.checkpoints import load_module, read_checkpoint
    from .training.module import MELoRAModule

    ckpt = read_checkpoint(ckpt_path)
    if "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {ckpt_path} is a sharded folder: resume it with fit --ckpt_path to write a "
                         f"full checkpoint (the strategy's default), then export that")
    try:
        return load_module(MELoRAModule, ckpt_path, **_model_settings(ckpt, ckpt_path, config, model_name_or_path))
    except ModelSourceError as err:
        if model_name_or_path is not None or command is None:
            raise
        raise ModelSourceError(f"{err}; the backbone's source is the one recorded in {ckpt_path}: pass "
                               f"{command} --model_name_or_path DIR to load it from another folder") from None


def export_checkpoint(
    ckpt_path: str,
    output_dir: str,
    format: str = "all",  # noqa: A002 - the CLI option's name
    config: str | None = None,
    model_name_or_path: str | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write the exports of a checkpoint; returns ``{format: folder}``.

    With ``format="all"`` the folders are ``output_dir/merged``, ``output_dir/adapter`` and
    ``output_dir/peft``; with one format, ``output_dir`` itself. ``output_dir`` is written whole or
    not at all (:func:`~melora_lit.run.staged_folder`); an existing non-empty one is replaced only
    with ``overwrite``, and never one that is, lies inside or holds the checkpoint, the config, the
    backbone's folder or a run's folder (:func:`~melora_lit.run.check_output`).
    """
    from transformers import AutoTokenizer

    from .adapter import export_peft_lora, save_adapter
    from .adapter import merge_melora
    from .adapter.quantize import dequantize_model
    from .sources import describe_base, gguf_source, resolve_pretrained
    from .training.checkpoints import read_checkpoint

    if format not in (*FORMATS, "all"):
        raise ValueError(f"format={format!r} is not valid; use one of {', '.join(FORMATS)}, all")
    out = Path(output_dir)
    inputs = [("--ckpt_path", ckpt_path), ("--config", config), ("--model_name_or_path", model_name_or_path)]
    check_output(out, "output_dir", overwrite, folder=True, inputs=inputs)  # before anything is read
    ckpt = read_checkpoint(ckpt_path)  # once, for the recorded backbone and every model card
    if model_name_or_path is None:  # the backbone it records is an input too, before it is loaded
        recorded = (ckpt.get("hyper_parameters") or {}).get("model_name_or_path")
        check_protected(out, "output_dir", [("model_name_or_path recorded in the checkpoint", recorded)],
                        replaced=overwrite)
    formats = list(FORMATS) if format == "all" else [format]

    module = load_checkpoint_model(ckpt_path, config, model_name_or_path, command="export")
    hp = module.hparams
    source = gguf_source(hp.model_name_or_path, hp.get("gguf_file"))
    resolved = resolve_pretrained(hp.model_name_or_path, hp.get("gguf_file"))
    # for other tools: the hub id where there is one, else what the base was (a GGUF file and its
    # quantization, a package's model: not their cache path on this machine)
    base = describe_base(hp.model_name_or_path, hp.get("gguf_file"))
    loadable = base.hub_id or base.text
    model = module.model
    remove_stale_temp_files(out.parent)  # what a killed export left
    with staged_folder(out) as staging:  # every format whole, or nothing
        targets = {f: (staging / f if format == "all" else staging) for f in formats}
        if "adapter" in targets:
            save_adapter(model, targets["adapter"], module.melora_config, base_model_name_or_path=source)
        if "peft" in targets:
            export_peft_lora(model, targets["peft"], module.melora_config, base_model_name_or_path=loadable)
        if "merged" in targets:  # last: merging replaces the adapted layers
            merge_melora(model)
            dequantize_model(model)  # a quantized backbone's layers MELoRA did not adapt
            model.save_pretrained(targets["merged"])
            AutoTokenizer.from_pretrained(resolved).save_pretrained(targets["merged"])
        for name, path in targets.items():
            write_model_card(path, name, ckpt_path, config, base=base, ckpt=ckpt)
    written = {name: (out / name if format == "all" else out) for name in targets}
    for name, path in written.items():
        print(f"melora-lit: wrote {name} to {path}")
    return written


def _usage(kind: str, base: BaseDescription, task: type[Task], melora: dict[str, Any]) -> list[str]:
    """Copy-paste snippets for a model card: loading this folder with transformers, PEFT or
    melora_lit, and serving it with vLLM (a task that generates)."""
    auto = task.auto_model_class
    name = base.hub_id or "BASE_MODEL"
    where = "" if base.hub_id else f"  # BASE_MODEL: {base.text}"
    if kind == "merged":
        code = [f"from transformers import {auto}, AutoTokenizer", "",
                f'model = {auto}.from_pretrained("path/to/this/folder")',
                'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")']
        serve = ["vllm serve path/to/this/folder"]
    elif kind == "peft":
        code = ["from peft import PeftModel", f"from transformers import {auto}", "",
                f'base = {auto}.from_pretrained("{name}"){where}',
                'model = PeftModel.from_pretrained(base, "path/to/this/folder")']
        rank = (melora.get("n") or 1) * (melora.get("r") or 1)
        serve = [f"vllm serve {name} --enable-lora --max-lora-rank {max(8, 1 << (rank - 1).bit_length())} "
                 f"--lora-modules melora=path/to/this/folder{where}"]
    else:
        code = ["from melora_lit import load_adapter", f"from transformers import {auto}", "",
                f'model = load_adapter({auto}.from_pretrained("{name}"), "path/to/this/folder"){where}']
        serve = []
    lines = ["```python", *code, "```"]
    if task.generates and serve:
        lines += ["", "```bash", *serve, "```"]
    return lines


# the data module arguments a model card names: where the training data came from
_DATA_KEYS = ("task", "dataset_name", "dataset_config", "data_dir", "train_file", "validation_file")
_LIBRARY = {"merged": "transformers", "peft": "peft", "adapter": "melora-lit"}


def run_config(ckpt_path: str, config: str | None) -> dict[str, Any]:
    """The run's config: ``config``, else the ``config.yaml`` LightningCLI saved beside the
    checkpoint's folder (``RUN/checkpoints/x.ckpt`` -> ``RUN/config.yaml``); {} if none."""
    import yaml

    path = Path(config) if config else Path(ckpt_path).resolve().parent.parent / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except yaml.YAMLError:
        data = None
    return data if isinstance(data, dict) else {}


def _best_metric(ckpt: dict[str, Any]) -> tuple[str, float, int | None] | None:
    """(monitor, best value, step) from the checkpoint's ModelCheckpoint state, else from
    ``hp_metric``'s (:class:`~melora_lit.training.monitoring.BestMetricHParams`)."""
    states = ckpt.get("callbacks") or {}
    for key, state in states.items():
        if "Checkpoint" in key and isinstance(state, dict) and state.get("monitor") \
                and state.get("best_model_score") is not None:
            return state["monitor"], float(state["best_model_score"]), None
    for key, state in states.items():
        if key.startswith("BestMetricHParams") and isinstance(state, dict) and state.get("best") is not None:
            return state.get("monitor") or "hp_metric", float(state["best"]), state.get("best_step")
    return None


def write_model_card(folder: Path, kind: str, ckpt_path: str, config: str | None = None,
                     base: BaseDescription | None = None, ckpt: dict[str, Any] | None = None) -> Path:
    """Write ``folder/README.md``, a Hugging Face model card: YAML front matter (``base_model``
    where the base has a hub id, ``license`` as the base's files declare it, else ``other``,
    ``library_name``: ``transformers`` for ``merged``, ``peft`` for ``peft``, ``melora-lit`` for
    ``adapter``; ``tags``, ``pipeline_tag``), what the base was, copy-paste usage (transformers,
    PEFT, vLLM for a causal LM, melora_lit), then the MELoRA settings (n, r, alpha, targets), the
    training data (the data module's class and files or task, from the run's config) and the best
    validation metric (the checkpoint's ModelCheckpoint state, else ``hp_metric``). ``base``: the
    backbone as :func:`~melora_lit.sources.describe_base` gives it (else described from the
    checkpoint); ``ckpt``: the checkpoint as already read (else it is read from ``ckpt_path``)."""
    import yaml

    from .sources import describe_base
    from .training.checkpoints import read_checkpoint
    from .training.tasks import task_class

    ckpt = ckpt if ckpt is not None else read_checkpoint(ckpt_path)
    hparams = ckpt.get("hyper_parameters") or {}
    melora = (ckpt.get("melora") or {}).get("config") or hparams.get("melora") or {}
    base = base or describe_base(hparams.get("model_name_or_path") or "unknown", hparams.get("gguf_file"))
    task = task_class(hparams.get("task"))
    front: dict[str, Any] = {**({"base_model": base.hub_id} if base.hub_id else {}),
                             "license": base.license or "other", "library_name": _LIBRARY[kind],
                             "tags": ["melora", "lora", "melora-lit", "lightning"],
                             "pipeline_tag": task.pipeline_tag}
    data = run_config(ckpt_path, config).get("data") or {}
    data_class = data.get("class_path") if isinstance(data, dict) else None
    data_args = (data.get("init_args") or {}) if isinstance(data, dict) else {}
    sources = {k: data_args[k] for k in _DATA_KEYS if data_args.get(k) not in (None, "")}
    if data_class and data_class.endswith("GLUEDataModule") and data_args.get("data_dir") is None:
        front["datasets"] = ["nyu-mll/glue"]
    elif data_args.get("dataset_name"):
        front["datasets"] = [data_args["dataset_name"]]
    best = _best_metric(ckpt)
    what = {"merged": "the backbone with the MELoRA updates merged into its weights (plain transformers)",
            "peft": "the MELoRA adapter as a PEFT LoRA adapter of rank n·r (`PeftModel.from_pretrained`)",
            "adapter": "the melora-lit adapter folder (`melora_lit.load_adapter`)"}[kind]
    targets = ", ".join(f"`{t}`" for t in melora.get("target_modules") or []) or "-"
    license_note = "" if base.license else " The base model's license is not recorded here: check it before use."
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {Path(str(base.hub_id or hparams.get('model_name_or_path'))).name} fine-tuned with MELoRA", "",
        f"This folder holds {what}, exported by `melora-lit export` from `{Path(ckpt_path).name}` "
        f"(step {ckpt.get('global_step', '?')}, epoch {ckpt.get('epoch', '?')}).", "",
        f"Base model: {base.text}.{license_note}", "",
        "## Usage", "", *_usage(kind, base, task, melora), "",
        "## MELoRA", "",
        "| n | r | alpha | equivalent rank n·r | target modules | modules saved in full |",
        "|---|---|---|---|---|---|",
        f"| {melora.get('n', '?')} | {melora.get('r', '?')} | {melora.get('alpha', '?')} | "
        f"{melora.get('n', 0) * melora.get('r', 0) or '?'} | {targets} | "
        f"{', '.join(melora.get('modules_to_save') or []) or '-'} |", "",
        "## Training data", "",
        f"`{data_class or 'unknown (no run config found)'}`"
        + ("\n" if sources else "") + "".join(f"\n- {k}: `{v}`" for k, v in sources.items()), "",
        "## Best validation metric", "",
        (f"{best[0]} = {best[1]:.6g}" + (f" (step {best[2]})" if best[2] is not None else "")) if best
        else "not recorded (the run had no validation)", "",
        "## Training hyper-parameters", "",
        *[f"- {k}: `{hparams[k]}`" for k in ("learning_rate", "head_learning_rate", "weight_decay", "warmup_ratio")
          if k in hparams], "",
    ]
    path = Path(folder) / "README.md"
    path.write_text("\n".join(lines))
    return path


def export_main(args: Sequence[str]) -> dict[str, Path]:
    """``melora-lit export ...`` (args after ``export``)."""
    opts = _parser().parse_args(list(args))
    return export_checkpoint(opts.ckpt_path, opts.output_dir, opts.format, opts.config,
                             opts.model_name_or_path, opts.overwrite)
