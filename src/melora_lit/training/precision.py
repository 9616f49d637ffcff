"""A low-precision frozen backbone (``backbone_dtype: bfloat16``) with float32 trained parts: the
adapters and ``modules_to_save`` keep float32 weights, and a saved module computes in float32
while handing the backbone its own dtype back."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ..adapter import melora_layers

__all__ = ["keep_trainable_float32"]


def keep_trainable_float32(model: nn.Module, modules_to_save: Iterable[str]) -> None:
    """Keep the trained parameters in float32 under a low-precision backbone (the layer casts
    them to its compute dtype on the fly; merging adds the update in float32)."""
    with torch.no_grad():
        for layer in melora_layers(model).values():
            layer.lora_A.data = layer.lora_A.data.float()
            layer.lora_B.data = layer.lora_B.data.float()
        for name in modules_to_save:
            saved = model.get_submodule(name).float()
            # the backbone hands it low-precision activations: compute in float32, hand back
            # the backbone's dtype (a classifier head's logits included)
            saved.register_forward_pre_hook(_inputs_to_float32, with_kwargs=True)
            saved.register_forward_hook(_output_to_input_dtype, with_kwargs=True)


def _low_precision_dtype(args: tuple, kwargs: dict) -> torch.dtype | None:
    for value in (*args, *kwargs.values()):
        if torch.is_tensor(value) and value.is_floating_point() and value.dtype != torch.float32:
            return value.dtype
    return None


def _inputs_to_float32(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    module._melora_input_dtype = _low_precision_dtype(args, kwargs)
    if module._melora_input_dtype is None:
        return args, kwargs

    def cast(v: Any) -> Any:
        return v.float() if torch.is_tensor(v) and v.is_floating_point() else v

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


def _output_to_input_dtype(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    dtype = getattr(module, "_melora_input_dtype", None)
    if dtype is not None and torch.is_tensor(output) and output.is_floating_point():
        return output.to(dtype)
    return output
