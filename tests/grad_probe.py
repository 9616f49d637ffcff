"""A callback for tests: what the first optimizer step is made of, saved from rank 0 to a file."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback


class RecordFirstStep(Callback):
    """Saves the trainable parameters and their gradients as the first optimizer step sees them
    (after every backward of the step and the gradient all-reduce), and the logged
    ``train/loss_step`` of that step, to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.record: dict | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.record is None:
            named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
            self.record = {"params": {n: p.detach().clone() for n, p in named},
                           "grads": {n: p.grad.detach().clone() for n, p in named if p.grad is not None}}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.record is not None and "loss" not in self.record and trainer.global_step == 1:
            self.record["loss"] = float(trainer.callback_metrics["train/loss_step"])
            if trainer.is_global_zero:
                torch.save(self.record, self.path)
