"""The optimizer and learning-rate schedule of a MELoRA run.

Parameters come in groups: the adapter at ``learning_rate``, the ``modules_to_save`` (the head)
at ``head_learning_rate``, and no weight decay on 1-D parameters (biases, normalization
weights). The optimizer is AdamW unless an optimizer callable is given (``--optimizer SGD``,
LightningCLI's ``OptimizerCallable``); it receives the groups, so each group's ``lr`` and
``weight_decay`` are the module's settings. The schedule is stepped every optimizer step: a named
schedule with warmup (:data:`SCHEDULES`), or any torch scheduler given as a callable
(``--lr_scheduler StepLR``, LightningCLI's ``LRSchedulerCallable``).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ReduceLROnPlateau

from ..adapter.inject import adapter_params, is_adapter_key

__all__ = ["SCHEDULES", "ScheduleName", "check_optimizer", "parameter_groups", "configure_optimization"]

ScheduleName = Literal["linear", "cosine", "constant"]


def _schedules() -> dict[str, Callable[..., Any]]:
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    return {
        # warmup, then linear decay to zero at the last step (the paper's code; the default)
        "linear": get_linear_schedule_with_warmup,
        # warmup, then half a cosine down to zero (LitGPT's and torchtune's default)
        "cosine": get_cosine_schedule_with_warmup,
        # warmup, then constant
        "constant": lambda optimizer, num_warmup_steps, num_training_steps: get_constant_schedule_with_warmup(
            optimizer, num_warmup_steps),
    }


#: named schedules with a linear warmup, as in ``transformers.get_*_schedule_with_warmup``
SCHEDULES: tuple[str, ...] = ("linear", "cosine", "constant")


def check_optimizer(optimizer: Callable[[Iterable], Optimizer]) -> None:
    """Refuse (one-line ValueError) an optimizer callable whose ``lr`` or ``weight_decay`` differs
    from its class's default: the parameter groups would silently replace it."""
    import inspect

    probe = optimizer([nn.Parameter(torch.zeros(1))])
    defaults = inspect.signature(type(probe)).parameters
    for key, option in (("lr", "learning_rate"), ("weight_decay", "weight_decay")):
        default = defaults[key].default if key in defaults else inspect.Parameter.empty
        if key in probe.defaults and default is not inspect.Parameter.empty and probe.defaults[key] != default:
            raise ValueError(f"optimizer {key}={probe.defaults[key]!r} is not used: each parameter group gets "
                             f"--model.{option}" + (" (and --model.head_learning_rate)" if key == "lr" else "")
                             + "; set that instead")


def parameter_groups(model: nn.Module, modules_to_save: Iterable[str], learning_rate: float,
                     head_learning_rate: float | None, weight_decay: float) -> list[dict[str, Any]]:
    """The adapter's parameters (:func:`~melora_lit.adapter.inject.adapter_params`) in groups of
    equal ``(lr, weight_decay)``, in the order their first parameter appears."""
    saved = tuple(modules_to_save)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    for name, p in adapter_params(model, saved).items():
        # a saved module's, by its first name: a head tied to the input embeddings trains at their rate
        is_head = is_adapter_key(name, (), saved)
        lr = head_learning_rate if is_head and head_learning_rate is not None else learning_rate
        # biases and norm weights are 1-D; decaying them hurts and the paper's code does not
        wd = 0.0 if p.ndim < 2 else weight_decay
        groups.setdefault((lr, wd), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def configure_optimization(
    groups: list[dict[str, Any]],
    total_steps: int,
    *,
    learning_rate: float,
    adam_betas: tuple[float, float],
    adam_eps: float,
    warmup_ratio: float,
    warmup_steps: int | None,
    lr_schedule: str = "linear",
    optimizer: Callable[[Iterable], Optimizer] | None = None,
    lr_scheduler: Callable[[Optimizer], Any] | None = None,
    monitor: str = "val/loss",
) -> dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns for these parameter ``groups``.

    ``optimizer``/``lr_scheduler``: callables that replace AdamW and the named ``lr_schedule``.
    ``total_steps``: the run's optimizer steps (the named schedules end there). ``monitor``: the
    metric a ``ReduceLROnPlateau`` watches (stepped after each validation).
    """
    if optimizer is None:
        opt = torch.optim.AdamW(groups, lr=learning_rate, betas=tuple(adam_betas), eps=adam_eps)
    else:
        opt = optimizer(groups)
    if lr_scheduler is not None:
        scheduler = lr_scheduler(opt)
        if isinstance(scheduler, ReduceLROnPlateau):
            return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "monitor": monitor, "interval": "epoch"}}
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
    if lr_schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={lr_schedule!r} is not valid; use one of {', '.join(SCHEDULES)}")
    total = max(int(total_steps), 1)
    warmup = warmup_steps if warmup_steps is not None else int(warmup_ratio * total)
    scheduler = _schedules()[lr_schedule](opt, num_warmup_steps=min(warmup, total), num_training_steps=total)
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
