"""The trainable state of a sharded model, as full tensors and position-keyed optimizer state:
what the checkpoint format (:mod:`.checkpoints`) and the sharded strategies (:mod:`.strategies`)
both need, in a module of its own so that neither imports the other for it.

* :func:`is_sharded`: whether a model is sharded (FSDP1 wrappers or FSDP2 DTensors).
* :func:`gather_trainable_state` and :func:`load_full_state`: full tensors out of, and into, an
  FSDP2-sharded model (collectives).
* :func:`optimizer_state_to_positions` and :func:`optimizer_state_to_names`: an optimizer state
  keyed by parameter names (``torch.distributed.checkpoint``) and by position (a plain
  ``optimizer.state_dict()``, what every checkpoint holds).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["gather_trainable_state", "is_sharded", "load_full_state", "optimizer_state_to_names",
           "optimizer_state_to_positions"]


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module`` is sharded by FSDP (FSDP1 wrappers or FSDP2 DTensor parameters)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    try:
        from torch.distributed.tensor import DTensor  # torch >= 2.5
    except ImportError:
        from torch.distributed._tensor import DTensor

    return any(isinstance(m, FullyShardedDataParallel) for m in module.modules()) or any(
        isinstance(p, DTensor) for p in module.parameters()
    )


def gather_trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (and the buffers) of an FSDP2-sharded ``module`` as full CPU
    tensors on rank 0; an empty dict on the other ranks. A collective: every rank must call it.

    The frozen DTensors are dropped before the gather, so the backbone is never assembled. (Not
    for FSDP1, whose full state dict exists on rank 0 only, which ``ignore_frozen_params`` does
    not expect: :class:`FSDPStrategy` keeps Lightning's full state dict, filtered by the
    ``LightningModule``'s ``on_save_checkpoint``.)
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return get_model_state_dict(module, options=options)


def load_full_state(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load full (unsharded) tensors, e.g. an adapter checkpoint that every rank read, into the
    sharded ``module``: each rank keeps its own shard. Keys not in ``state`` are left alone.

    A collective: every rank must call it with the same keys.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[list[nn.Parameter]]:
    return [list(group["params"]) for group in optimizer.param_groups]


_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _clean_name(name: str) -> str:
    """A parameter name without the FSDP1, activation-checkpointing and compile wrappers."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The fully qualified name of each optimizer parameter, group by group, as the
    ``torch.distributed.checkpoint.state_dict`` functions name them."""
    names = {id(p): _clean_name(n) for n, p in module.named_parameters()}
    try:
        return [[names[id(p)] for p in ps] for ps in _optimizer_params(optimizer)]
    except KeyError:
        raise ValueError("the optimizer holds a parameter the model does not have") from None


def optimizer_state_to_positions(
    state: dict[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """An optimizer state keyed by parameter names (``get_optimizer_state_dict``) re-keyed as a
    plain ``optimizer.state_dict()``: by position in the optimizer's parameter groups.

    (Lightning's FSDP strategies key by position in ``model.parameters()``, frozen parameters
    included, which a plain optimizer of the trainable parameters reads wrongly.)
    """
    names = _param_names(module, optimizer)
    position = {n: i for i, n in enumerate(n for group in names for n in group)}
    groups, start = [], 0
    for saved, group_names in zip(state["param_groups"], names):
        groups.append({**{k: v for k, v in saved.items() if k != "params"},
                       "params": list(range(start, start + len(group_names)))})
        start += len(group_names)
    return {"state": {position[n]: s for n, s in state["state"].items()}, "param_groups": groups}


def optimizer_state_to_names(
    state: dict[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """The inverse of :func:`optimizer_state_to_positions`, checked against the optimizer."""
    names = _param_names(module, optimizer)
    saved_groups = state["param_groups"]
    if [len(g["params"]) for g in saved_groups] != [len(g) for g in names]:
        raise ValueError(
            "checkpoint optimizer state does not fit this model: parameter groups of sizes "
            f"{[len(g['params']) for g in saved_groups]}, expected {[len(g) for g in names]}"
        )
    by_id = {}
    for saved, group_names in zip(saved_groups, names):
        by_id.update(zip(saved["params"], group_names))
    return {
        "state": {by_id[i]: s for i, s in state["state"].items()},
        "param_groups": [{**{k: v for k, v in saved.items() if k != "params"}, "params": group_names}
                         for saved, group_names in zip(saved_groups, names)],
    }
