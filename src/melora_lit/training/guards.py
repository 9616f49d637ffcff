"""The non-finite guard: a NaN or Inf loss or gradient never reaches the weights."""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["NonFiniteError", "NonFiniteGuard"]


class NonFiniteError(ValueError):
    """A non-finite loss or gradient stopped the run (the CLI: one line, exit status 2)."""


class NonFiniteGuard(Callback):
    """Stop, or skip the step, when the loss or a gradient is NaN or Inf.

    The check runs after backward and before the optimizer step, over the trainable parameters
    (the adapter and the head: cheap), so non-finite values never reach the weights or a
    checkpoint.

    Args:
        action: ``stop``: end the run with an error naming the step (the CLI exits with status 2);
            the last checkpoint stays as it was. ``skip``: drop that step's gradients (the
            optimizer leaves every weight and its moments as they were), count it and log the
            count as ``train/skipped_steps``.
        max_skipped: with ``skip``, stop anyway after this many skipped steps (None: never).

    Under ``16-mixed`` precision a gradient overflow is the gradient scaler's business (it skips
    the step and lowers the scale): only the loss is checked there.
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", max_skipped: int | None = None) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"nan_guard.action={action!r} is not valid; use stop or skip")
        if max_skipped is not None and (not isinstance(max_skipped, int) or max_skipped < 0):
            raise ValueError(f"nan_guard.max_skipped={max_skipped!r} is not valid; use an integer >= 0")
        self.action = action
        self.max_skipped = max_skipped
        self.skipped_steps = 0
        self._loss_finite = True
        self._batch_idx = 0

    @property
    def state_key(self) -> str:
        return "NonFiniteGuard"

    def state_dict(self) -> dict[str, int]:
        return {"skipped_steps": self.skipped_steps}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        # and-ed over the micro-batches of an accumulated step; reset after each optimizer step
        self._loss_finite = self._loss_finite and bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        what = None if self._loss_finite else "loss"
        self._loss_finite = True
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if what is None and scaler is None and params:
            norms = torch.stack([p.grad.detach().float().abs().amax() for p in params])
            if not bool(torch.isfinite(norms).all()):
                what = "gradient"
        # all ranks decide alike (DDP averages gradients, but the loss is per rank)
        bad = trainer.strategy.reduce_boolean_decision(what is not None, all=False)
        if not bad:
            return
        step = trainer.global_step + 1
        where = f"optimizer step {step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        if self.action == "skip" and (self.max_skipped is None or self.skipped_steps < self.max_skipped):
            # grad None, not zero: AdamW then leaves the weights and their moments untouched
            for p in params:
                p.grad = None
            self.skipped_steps += 1
            rank_zero_info(f"melora-lit: non-finite {what or 'value'} at {where}: step skipped "
                           f"({self.skipped_steps} so far)")
            return
        last = _last_checkpoint(trainer)
        kept = f"; the last checkpoint {last} is kept" if last else ""
        hint = "lower the learning rate" + (", or --nan_guard.action skip" if self.action == "stop" else "")
        raise NonFiniteError(f"non-finite {what or 'loss or gradient (on another process)'} at {where}{kept}; "
                             f"{hint}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.action == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False,
                          batch_size=1)


def _last_checkpoint(trainer: L.Trainer) -> str | None:
    for cb in trainer.checkpoint_callbacks:
        path = getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "")
        if path:
            return str(path)
    return None
