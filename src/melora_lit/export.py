"""``melora-lit export``: turn a training checkpoint into files that other tools load.

* ``merged``: the backbone with every MELoRA update folded into its weights, saved as a plain
  transformers folder (config, safetensors, tokenizer): ``AutoModelFor...from_pretrained`` loads
  it without melora_lit and gives the adapted model's outputs.
* ``adapter``: the melora_lit adapter folder (:func:`~melora_lit.adapter.io.save_adapter`).
* ``peft``: the adapter as a standard PEFT LoRA adapter of rank n·r
  (:func:`~melora_lit.adapter.io.export_peft_lora`).

Works for classifiers and causal LMs alike: the checkpoint's hyper-parameters rebuild the model
(its backbone from its source), then the checkpoint's adapter is loaded into it.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any, Sequence

FORMATS = ("merged", "adapter", "peft")

__all__ = ["FORMATS", "export_checkpoint", "export_main", "load_checkpoint_model"]


class _OneLineParser(argparse.ArgumentParser):
    """Usage errors as a ValueError, which ``melora-lit`` prints as one line (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ValueError(f"export: {message} (see melora-lit export --help)")


def _parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
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
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty output folder")
    return p


def _model_settings(ckpt: dict, ckpt_path: str, config: str | None, model_name_or_path: str | None) -> dict[str, Any]:
    from .adapter import MELoRAConfig
    from .training.module import MELoRAModule

    hparams = dict(ckpt.get("hyper_parameters") or {})
    if "melora" not in ckpt or "model_name_or_path" not in hparams:
        raise ValueError(f"{ckpt_path} is not a melora-lit checkpoint (no adapter metadata or hyper-parameters)")
    settings: dict[str, Any] = {}
    if config is not None:
        import yaml

        path = Path(config)
        if not path.is_file():
            raise ValueError(f"config file not found: {config}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ValueError(f"cannot read {config}: {str(err).splitlines()[0]}") from None
        model = (data or {}).get("model") if isinstance(data, dict) else None
        if not isinstance(model, dict):
            raise ValueError(f"{config} has no model section")
        settings.update(model.get("init_args", model))
    # The checkpoint's hyper-parameters win, as with validate/predict --ckpt_path.
    settings.update(hparams)
    if model_name_or_path is not None:
        settings["model_name_or_path"] = model_name_or_path
    known = set(inspect.signature(MELoRAModule.__init__).parameters) - {"self", "generation"}
    settings = {k: v for k, v in settings.items() if k in known}
    if isinstance(settings.get("melora"), dict):
        settings["melora"] = MELoRAConfig(**settings["melora"])
    return settings


def load_checkpoint_model(ckpt_path: str, config: str | None = None, model_name_or_path: str | None = None):
    """The :class:`~melora_lit.training.module.MELoRAModule` of a checkpoint, backbone loaded from its
    source and adapter from the checkpoint, in eval mode."""
    import torch

    from .training.module import MELoRAModule

    path = Path(ckpt_path)
    if not path.is_file():
        raise ValueError(f"checkpoint not found: {ckpt_path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle, zip and weights-only errors alike mean "not a checkpoint"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot read checkpoint {ckpt_path}: {first}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{ckpt_path} is not a melora-lit checkpoint")
    module = MELoRAModule(**_model_settings(ckpt, ckpt_path, config, model_name_or_path))
    module.configure_model()
    module.on_load_checkpoint(ckpt)
    return module.eval()


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
    ``output_dir/peft``; with one format, ``output_dir`` itself.
    """
    from transformers import AutoTokenizer

    from .adapter import export_peft_lora, save_adapter
    from .adapter import merge_melora
    from .adapter.quantize import dequantize_model
    from .sources import PACKAGE_PREFIX, gguf_source, locate_gguf, resolve_pretrained

    if format not in (*FORMATS, "all"):
        raise ValueError(f"format={format!r} is not valid; use one of {', '.join(FORMATS)}, all")
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {output_dir} is a file")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(f"output_dir {output_dir} is not empty; pass --overwrite to write into it")
    formats = list(FORMATS) if format == "all" else [format]
    targets = {f: (out / f if format == "all" else out) for f in formats}

    module = load_checkpoint_model(ckpt_path, config, model_name_or_path)
    hp = module.hparams
    source = gguf_source(hp.model_name_or_path, hp.get("gguf_file"))
    resolved = resolve_pretrained(hp.model_name_or_path, hp.get("gguf_file"))
    # what other tools can load: package and GGUF sources only exist as their local folder
    loadable = resolved if source.startswith(PACKAGE_PREFIX) or locate_gguf(source) else source
    model = module.model
    written: dict[str, Path] = {}
    if "adapter" in targets:
        written["adapter"] = save_adapter(model, targets["adapter"], base_model_name_or_path=source)
    if "peft" in targets:
        written["peft"] = export_peft_lora(model, targets["peft"], base_model_name_or_path=loadable)
    if "merged" in targets:  # last: merging replaces the adapted layers
        merge_melora(model)
        dequantize_model(model)  # a quantized backbone's layers MELoRA did not adapt
        target = targets["merged"]
        model.save_pretrained(target)
        AutoTokenizer.from_pretrained(resolved).save_pretrained(target)
        written["merged"] = target
    for name, path in written.items():
        print(f"melora-lit: wrote {name} to {path}")
    return written


def export_main(args: Sequence[str]) -> dict[str, Path]:
    """``melora-lit export ...`` (args after ``export``)."""
    opts = _parser().parse_args(list(args))
    return export_checkpoint(opts.ckpt_path, opts.output_dir, opts.format, opts.config,
                             opts.model_name_or_path, opts.overwrite)


if __name__ == "__main__":  # python -m melora_lit.export ...
    try:
        export_main(sys.argv[1:])
    except ValueError as err:
        print(f"melora-lit: error: {str(err).strip().splitlines()[0]}", file=sys.stderr)
        sys.exit(2)
