"""Quantized frozen backbones (QLoRA-style): the frozen ``nn.Linear`` weights stored in 4 or 8
bits, the MELoRA adapters (and the head) in full precision.

Schemes, both through `torchao <https://github.com/pytorch/ao>`_ (plain torch ops, so the same
code runs on CPU and CUDA):

* ``nf4``: 4-bit NormalFloat in blocks of 64 weights with double quantization of the block
  scales (int8, in blocks of up to 256 scales), as in QLoRA: torchao's ``NF4Tensor``, the tensor
  torchtune's QLoRA recipes train on. About 4.5 bits per weight.
* ``int8``: int8 weight-only, symmetric, one scale per output row: torchao's
  ``Int8WeightOnlyConfig``. About 8 bits per weight.

The quantized weight stays the ``weight`` parameter of its ``nn.Linear`` (a tensor subclass), so
module paths and state-dict keys do not change; ``F.linear`` on it dequantizes on the fly in the
forward and again in the backward (only the quantized tensor is kept for backward). The MELoRA
update is added in full precision exactly as on a plain base. Merging dequantizes (to the dtype
the backbone had before quantization: float32, or bfloat16/float16 with ``backbone_dtype``):
re-quantizing the merged weight would round the update away.

What is quantized: every frozen ``nn.Linear`` (MELoRA bases and the layers MELoRA does not
adapt), never the embeddings, norms, the output head (``lm_head`` / the output embeddings) or
trainable modules (``modules_to_save``). transformers' GPT-2 style ``Conv1D`` is not quantized.
A layer whose size is not a multiple of the scheme's block (64 weights for nf4) stays as it was.

torchao is imported on first use only: :mod:`melora_lit.adapter` imports with torch alone.
"""

from __future__ import annotations

import importlib.util
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..errors import first_line

__all__ = [
    "SCHEMES",
    "QuantizationSummary",
    "check_scheme",
    "check_device",
    "quantize_backbone",
    "quantizable_layers",
    "is_quantized",
    "dequantize",
    "dequantize_model",
    "keep_out_of_ddp_broadcast",
    "tensor_bytes",
    "frozen_bytes",
]

SCHEMES = ("nf4", "int8")
LIBRARY = "torchao"
MIN_TORCHAO = "0.18"
# what torchao's nf4 and int8 weight-only tensors run on (pure torch ops, tested upstream there)
DEVICE_TYPES = ("cpu", "cuda")
NF4_BLOCK = 64  # weights per absmax block (QLoRA's)
NF4_SCALER_BLOCK = 256  # absmax scales per double-quantization block (QLoRA's), or fewer, see _scaler_block


@dataclass
class QuantizationSummary:
    """What :func:`quantize_backbone` did: the scheme, the layers quantized and those left as
    they were (size not a multiple of the block), and the frozen backbone's bytes before and
    after."""

    scheme: str
    quantized: list[str]
    skipped: list[str]
    bytes_before: int
    bytes_after: int

    def __str__(self) -> str:
        skipped = f", {len(self.skipped)} left unquantized ({', '.join(self.skipped[:3])}...)" if self.skipped else ""
        return (f"quantization {self.scheme}: {len(self.quantized)} linear layers{skipped}; frozen backbone "
                f"{self.bytes_before / 2**20:.1f} MiB -> {self.bytes_after / 2**20:.1f} MiB")


def check_scheme(scheme: str | None) -> None:
    """Raise a one-line ``ValueError`` unless ``scheme`` is None or a scheme the installed
    torchao can run. Imports nothing heavy: it runs before any weights are loaded."""
    if scheme is None:
        return
    if scheme not in SCHEMES:
        raise ValueError(f"quantization={scheme!r} is not valid; use one of {', '.join(SCHEMES)} (or leave it unset)")
    if importlib.util.find_spec(LIBRARY) is None:
        raise ValueError(f"quantization={scheme!r} needs torchao>={MIN_TORCHAO}, which is not installed: "
                         f"pip install 'melora-lit[quantization]'")


def check_device(scheme: str | None, device: torch.device | str) -> None:
    """Raise a one-line ``ValueError`` when ``scheme`` cannot run on ``device``."""
    device = torch.device(device)
    if scheme is not None and device.type not in DEVICE_TYPES:
        raise ValueError(f"quantization={scheme!r} runs on {' or '.join(DEVICE_TYPES)}, not on {device.type}; "
                         "drop --model.quantization or change --trainer.accelerator")


@contextmanager
def _quiet_import() -> Iterator[None]:
    # torchao's import logs a warning per CUDA-only extension a CPU build of torch cannot load,
    # and torch one about an Enum torchao registers; neither matters for these schemes
    loggers = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchao():
    """The torchao entry points this module uses; a one-line ``ValueError`` when the installed
    torchao lacks them."""
    try:
        with _quiet_import():
            from torchao.quantization import Int8WeightOnlyConfig, quantize_, to_nf4
    except ImportError as err:
        raise ValueError(f"quantization needs torchao>={MIN_TORCHAO}; the installed one cannot be used "
                         f"({first_line(err)}): pip install -U 'melora-lit[quantization]'") from None
    return Int8WeightOnlyConfig, quantize_, to_nf4


def is_quantized(t: torch.Tensor) -> bool:
    """Whether ``t`` is a quantized tensor (a torch tensor subclass, not a plain tensor or
    parameter)."""
    return isinstance(t, torch.Tensor) and type(t) not in (torch.Tensor, nn.Parameter)


def dequantize(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor holding the values of a quantized weight, in its original dtype; plain
    tensors come back as they are."""
    if not is_quantized(t):
        return t
    with torch.no_grad():
        if hasattr(t, "get_original_weight"):  # torchao NF4Tensor
            return t.get_original_weight()
        return t.dequantize()


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor's storage holds; for a quantized tensor, those of the tensors it is made of
    (codes, scales, ...)."""
    if is_quantized(t) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, name)) for name in names)
    return t.numel() * t.element_size()


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of a model's frozen parameters and buffers (a tied weight counted once)."""
    seen: set[int] = set()
    total = 0
    for p in [*model.parameters(), *model.buffers()]:
        if p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        total += tensor_bytes(p)
    return total


def _scaler_block(n_blocks: int) -> int:
    """QLoRA's 256 scales per double-quantization block, or the largest divisor of the number
    of scales below that (torchao needs a divisor: SmolLM2's k_proj has 1728 scales)."""
    return max(d for d in range(1, min(NF4_SCALER_BLOCK, n_blocks) + 1) if n_blocks % d == 0)


def quantizable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The layers :func:`quantize_backbone` quantizes: the frozen ``nn.Linear`` layers of a model
    not yet quantized, minus its output head."""
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    tied = {id(head.weight)} if head is not None and hasattr(head, "weight") else set()
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not head and not m.weight.requires_grad
            and id(m.weight) not in tied and not is_quantized(m.weight)}


def quantize_backbone(model: nn.Module, scheme: str) -> QuantizationSummary:
    """Quantize the frozen linear layers of ``model`` in place (see the module docstring).

    Call it after :func:`~melora_lit.adapter.inject_melora`, so that the adapters and the
    ``modules_to_save`` are already the trainable parameters that stay in full precision.
    """
    if scheme is None:
        raise ValueError(f"quantize_backbone needs a scheme; use one of {', '.join(SCHEMES)}")
    check_scheme(scheme)
    Int8WeightOnlyConfig, quantize_, to_nf4 = _torchao()
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError(f"quantization={scheme!r}: the model has no frozen nn.Linear layer to quantize "
                         "(GPT-2 style Conv1D layers are not supported)")
    before = frozen_bytes(model)
    quantized, skipped = [], []
    if scheme == "nf4":
        for name, layer in layers.items():
            numel = layer.weight.numel()
            if numel % NF4_BLOCK:
                skipped.append(name)
                continue
            with torch.no_grad():
                w = to_nf4(layer.weight.detach(), NF4_BLOCK, _scaler_block(numel // NF4_BLOCK))
            layer.weight = nn.Parameter(w, requires_grad=False)
            quantized.append(name)
    else:
        chosen = {id(m) for m in layers.values()}
        # set_inductor_config=False: quantize_ would otherwise change torch._inductor's global config
        quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, _: id(m) in chosen)
        quantized = list(layers)
    return QuantizationSummary(scheme, quantized, skipped, before, frozen_bytes(model))


def keep_out_of_ddp_broadcast(wrapped: nn.Module, model: nn.Module, prefix: str) -> list[str]:
    """Name the quantized weights of ``model`` (a submodule of ``wrapped`` at ``prefix``) in
    ``wrapped._ddp_params_and_buffers_to_ignore``, the list ``DistributedDataParallel`` reads when
    it wraps ``wrapped``; returns the names.

    DDP broadcasts rank 0's parameters at start, and a quantized tensor would come back
    re-quantized from its dequantized values (not the same codes: the scales are double-quantized).
    Every rank quantizes the same weights the same way, and they never change, so there is nothing
    to broadcast."""
    names = [prefix + name for name, p in model.named_parameters() if is_quantized(p)]
    wrapped._ddp_params_and_buffers_to_ignore = sorted(  # type: ignore[assignment]
        {*getattr(wrapped, "_ddp_params_and_buffers_to_ignore", []), *names})
    return names


def dequantize_model(model: nn.Module) -> int:
    """Replace every quantized weight of ``model`` by its dequantized plain tensor, in place
    (what a merged export saves); returns how many were replaced."""
    count = 0
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if is_quantized(p):
                setattr(module, name, nn.Parameter(dequantize(p), requires_grad=p.requires_grad))
                count += 1
    return count
