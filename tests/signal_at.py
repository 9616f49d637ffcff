"""A test aid for real ``melora-lit`` processes: a callback, named in a run's config, that sends
the process a signal at one chosen moment (as a scheduler's preemption would, but at a point
chosen exactly). The tests put this folder on the child's ``PYTHONPATH``."""

from __future__ import annotations

import os
import signal

import lightning as L


class SignalAt(L.Callback):
    """Send ``signame`` to this process at ``moment`` of optimizer step ``step``:
    ``train_batch_end`` (right after the step) or ``validation`` (after the first validation
    batch that follows the step); or ``predict``: after predict batch number ``step`` (from 0)."""

    def __init__(self, signame: str, moment: str, step: int) -> None:
        self.signum, self.moment, self.step = getattr(signal, signame), moment, step
        self.sent = False

    def _send(self, trainer: L.Trainer, moment: str) -> None:
        if not self.sent and moment == self.moment and trainer.global_step == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._send(trainer, "train_batch_end")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._send(trainer, "validation")

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not self.sent and self.moment == "predict" and batch_idx == self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)
