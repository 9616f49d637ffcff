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


class WaitForSignalAt(L.Callback):
    """At ``moment`` (``train_batch_end`` of optimizer step ``step``, or ``predict``/``validation``
    after batch number ``step``), create the file ``ready`` and wait (at most 60 s) until the
    process has received a stop signal from outside: so that a test can send one, to the whole
    process group as a scheduler does, at a point chosen exactly and with the DataLoader workers
    alive. (A signal from this process itself would not do: PyTorch's workers treat a SIGTERM
    from their parent as a request to exit.)"""

    def __init__(self, moment: str, step: int, ready: str) -> None:
        self.moment, self.step, self.ready = moment, step, ready
        self.done = False

    def _wait(self, trainer: L.Trainer, moment: str, at: int) -> None:
        import time

        from melora_lit.run import preemption

        if self.done or moment != self.moment or at != self.step:
            return
        self.done = True
        open(self.ready, "w").close()
        deadline = time.monotonic() + 60
        while preemption.requested(trainer) is None and time.monotonic() < deadline:
            time.sleep(0.01)  # a SIGINT raises KeyboardInterrupt here, as anywhere in a loop
        time.sleep(0.2)  # what the signal did to the group's other processes (workers) shows before the loop goes on

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._wait(trainer, "train_batch_start", trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._wait(trainer, "train_batch_end", trainer.global_step)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.sanity_checking:
            self._wait(trainer, "validation", batch_idx)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._wait(trainer, "predict", batch_idx)
