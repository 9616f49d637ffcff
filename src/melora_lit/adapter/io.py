"""MELoRA adapter files, and their export as a standard PEFT LoRA adapter.

An adapter directory holds ``adapter_model.safetensors`` (adapter and ``modules_to_save``
tensors) and ``adapter_config.json`` (the :class:`MELoRAConfig`, the base model, the
package version). A PEFT export holds PEFT's two files, with nothing in
``adapter_config.json`` that PEFT does not know (so every PEFT version the project supports
loads it), and ``melora_config.json``, the MELoRA config it was converted from. Like the
core, this depends on torch and safetensors only.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .inject import (
    MELoRAConfig,
    adapter_state_dict,
    fresh_heads,
    inject_melora,
    load_adapter_state_dict,
    melora_layers,
    resolve_modules_to_save,
)
from .layer import _is_conv1d, block_diagonal

__all__ = ["save_adapter", "load_adapter", "load_adapter_config", "load_adapter_weights", "export_peft_lora"]

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: In a PEFT export: the MELoRA config it was converted from (PEFT ignores the file).
PEFT_PROVENANCE = "melora_config.json"


def _version() -> str:
    from .. import __version__

    return __version__


def _contiguous_cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in sd.items()}


def _require_layers(model: nn.Module) -> None:
    if not melora_layers(model):
        raise ValueError("model has no MELoRA layers; call inject_melora() before saving or exporting an adapter")


def _base_name(model: nn.Module, given: str | None) -> str | None:
    if given is not None:
        return str(given)
    cfg = getattr(model, "config", None)
    return getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or None


def save_adapter(model: nn.Module, directory: str | os.PathLike, config: MELoRAConfig,
                 base_model_name_or_path: str | None = None) -> Path:
    """Write the adapter of ``model``, injected with ``config`` (e.g.
    :attr:`~melora_lit.adapter.inject.InjectionSummary.config`), to ``directory``: safetensors
    weights and a JSON config."""
    _require_layers(model)
    saved = resolve_modules_to_save(model, config.modules_to_save)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous_cpu(adapter_state_dict(model, saved)), str(out / ADAPTER_WEIGHTS),
              metadata={"format": "pt", "melora_lit_version": _version()})
    meta = {
        "adapter_type": "MELORA",
        "melora_config": config.to_dict(),
        "base_model_name_or_path": _base_name(model, base_model_name_or_path),
        "melora_lit_version": _version(),
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_adapter_config(directory: str | os.PathLike) -> tuple[MELoRAConfig, dict]:
    """The :class:`MELoRAConfig` of a saved adapter, and the whole JSON metadata."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{directory}: no {ADAPTER_CONFIG}; not a melora_lit adapter directory")
    meta = json.loads(path.read_text())
    if meta.get("adapter_type") != "MELORA" or "melora_config" not in meta:
        raise ValueError(f"{path}: not a melora_lit adapter config (a PEFT adapter? load it with peft)")
    return MELoRAConfig(**meta["melora_config"]), meta


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Load a saved adapter into ``model``; injects MELoRA first if the model has none."""
    config, _ = load_adapter_config(directory)
    if not melora_layers(model):
        inject_melora(model, config)
    saved = resolve_modules_to_save(model, config.modules_to_save)
    load_adapter_state_dict(model, load_file(str(Path(directory) / ADAPTER_WEIGHTS)), saved)
    return model


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike, modules_to_save: list[str]) -> str:
    """Copy the weights of an adapter folder into ``model``'s MELoRA layers (already injected)
    and ``modules_to_save``: a melora_lit adapter (``export --format adapter``) or a PEFT LoRA
    adapter (``export --format peft``, or a rank-R LoRA trained elsewhere into ``n = 1``,
    ``r = R``). The update each layer computes is the folder's: a PEFT factor pair is cut into
    the n diagonal blocks (it must be zero elsewhere) and B rescaled from PEFT's
    ``lora_alpha / R`` to this layer's ``alpha / r``. Returns the folder's format (``melora`` or
    ``peft``); a folder that does not fit is a one-line ``ValueError``, before anything changes."""
    folder = Path(directory)
    config_file, weights_file = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(f"{folder} is not an adapter folder: it needs {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
                         f"(melora-lit export --format adapter or peft)")
    meta, tensors = json.loads(config_file.read_text()), load_file(str(weights_file))
    if meta.get("adapter_type") == "MELORA":
        load_adapter_state_dict(model, tensors, modules_to_save)
        return "melora"
    if meta.get("peft_type") != "LORA":
        raise ValueError(f"{config_file}: neither a melora_lit adapter nor a PEFT LoRA adapter "
                         f"(peft_type {meta.get('peft_type')!r})")
    state = {}
    for name, layer in melora_layers(model).items():
        a, b = (tensors.get(f"base_model.model.{name}.lora_{m}.weight") for m in "AB")
        if a is None or b is None:
            raise ValueError(f"{folder}: no LoRA factors for {name} (the folder adapts other modules)")
        n, r, rank = layer.n, layer.r, a.shape[0]
        if rank != n * r or a.shape[1] != layer.d_in or b.shape != (layer.d_out, rank):
            raise ValueError(f"{folder}: {name} has a rank-{rank} LoRA of {tuple(b.shape)} x {tuple(a.shape)}; this "
                             f"layer holds n*r = {n}*{r} = {n * r}, {layer.d_out} x {layer.d_in} (use the same "
                             f"--model.melora.n and r as the adapter)")
        a_blocks = torch.stack([a[i * r:(i + 1) * r, i * (layer.d_in // n):(i + 1) * (layer.d_in // n)]
                                for i in range(n)])
        b_blocks = torch.stack([b[i * (layer.d_out // n):(i + 1) * (layer.d_out // n), i * r:(i + 1) * r]
                                for i in range(n)])
        if not (torch.equal(block_diagonal(a_blocks), a) and torch.equal(block_diagonal(b_blocks), b)):
            raise ValueError(f"{folder}: the LoRA of {name} is not block-diagonal in {n} blocks, so MELoRA with "
                             f"n={n} cannot hold it (a plain LoRA fits n=1)")
        peft_scale = _pattern_value(meta.get("alpha_pattern") or {}, name, meta.get("lora_alpha", rank)) / rank
        state[f"{name}.lora_A"], state[f"{name}.lora_B"] = a_blocks, b_blocks * (peft_scale / layer.scaling)
    prefix = "base_model.model."
    for key, value in tensors.items():  # modules_to_save, as PEFT or our export names them
        if ".lora_" not in key:
            state[key.removeprefix(prefix).replace(".modules_to_save.default.", ".").replace(".modules_to_save.", ".")
                  ] = value
    load_adapter_state_dict(model, state, modules_to_save)
    return "peft"


def _pattern_value(patterns: dict[str, float], name: str, default: float) -> float:
    """PEFT's per-module value (``alpha_pattern``): the first key that matches the end of ``name``."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?{key}", name):
            return value
    return default


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    for suffix, task in (("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"),
                         ("LMHeadModel", "CAUSAL_LM"), ("ForTokenClassification", "TOKEN_CLS"),
                         ("ForQuestionAnswering", "QUESTION_ANS"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM")):
        if name.endswith(suffix):
            return task
    return None


def _target_modules(model: nn.Module, adapted: dict) -> list[str]:
    """PEFT's ``target_modules``: the adapted modules' own names (``q_proj``, ``v_proj``), as a
    PEFT user writes them, where those names select exactly the adapted modules of the base
    model; else every adapted module's full path."""
    names = sorted({name.rpartition(".")[2] for name in adapted})
    inside = tuple(f"{name}." for name in adapted)  # the MELoRA layers' own submodules (base, dropout)
    selected = {n for n, _ in model.named_modules() if n.rpartition(".")[2] in names and not n.startswith(inside)}
    return names if selected == set(adapted) else sorted(adapted)


def _pattern_key(name: str, adapted: dict) -> str:
    r"""A PEFT rank_pattern/alpha_pattern key that selects ``name`` alone among the adapted
    modules in every PEFT version: PEFT 0.13 matches a key only after a dot (``.*\.{key}$``),
    recent versions also the whole path (``(.*\.)?({key})$``). So the path without its first
    component, where that is unique (else the full path, which only recent versions match)."""
    _, _, tail = name.partition(".")
    if tail and sum(n == tail or n.endswith("." + tail) for n in adapted) == 1:
        return re.escape(tail)
    return re.escape(name)


def export_peft_lora(
    model: nn.Module,
    directory: str | os.PathLike,
    config: MELoRAConfig,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
) -> Path:
    """Export the MELoRA adapter of ``model`` as a standard PEFT LoRA adapter directory.

    blockdiag(B_i A_i) = B' A' with A' = blockdiag(A_1..A_n) (n*r x d_in) and
    B' = blockdiag(B_1..B_n) (d_out x n*r), so each adapted layer becomes a rank-n*r LoRA.
    PEFT scales by lora_alpha / (n*r); ``lora_alpha = alpha * n`` keeps the scale alpha/r.
    ``peft.PeftModel.from_pretrained`` (and any LoRA server) loads the result as is;
    ``config`` (the one ``model`` was injected with) goes to ``melora_config.json`` beside it.
    """
    _require_layers(model)
    layers = melora_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for name, layer in layers.items():
        with torch.no_grad():
            tensors[f"base_model.model.{name}.lora_A.weight"] = layer.dense_A()
            tensors[f"base_model.model.{name}.lora_B.weight"] = layer.dense_B()
        ranks[name] = layer.n * layer.r
        alphas[name] = layer.alpha * layer.n
    task = task_type or _task_type(model)
    saved = resolve_modules_to_save(model, config.modules_to_save)
    # PEFT adds the task head to modules_to_save for these task types and then requires its
    # weights in the adapter file; export the (possibly frozen) head the model runs with.
    for head in fresh_heads(task):
        for mname, _ in model.named_modules():
            if (mname == head or mname.endswith("." + head)) and not any(
                    mname == s or mname.startswith(s + ".") or s.startswith(mname + ".")
                    for s in [*saved, *layers]):
                saved.append(mname)
    full = model.state_dict()
    for prefix in saved:
        for key, value in full.items():
            if key.startswith(prefix + "."):
                tensors[f"base_model.model.{key}"] = value

    # The most common rank and alpha are the defaults; the rest go to PEFT's patterns.
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    conv1d = {_is_conv1d(layer.base) for layer in layers.values()}
    if len(conv1d) > 1:
        raise ValueError("cannot export a model that mixes Conv1D and Linear adapted layers as one PEFT adapter")
    peft_config = {
        "peft_type": "LORA",
        "task_type": task,
        "base_model_name_or_path": _base_name(model, base_model_name_or_path),
        "r": r0,
        "lora_alpha": a0,
        "lora_dropout": config.dropout,
        "target_modules": _target_modules(model, layers),
        "modules_to_save": saved or None,
        "rank_pattern": {_pattern_key(k, layers): v for k, v in ranks.items() if v != r0},
        "alpha_pattern": {_pattern_key(k, layers): v for k, v in alphas.items() if v != a0},
        "fan_in_fan_out": conv1d.pop(),
        "bias": "none",
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    provenance = {"converted_from": config.to_dict(), "melora_lit_version": _version()}
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_file(_contiguous_cpu(tensors), str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text(json.dumps(peft_config, indent=2) + "\n")
    (out / PEFT_PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return out
