"""Progress for job logs: plain lines where stdout is not a terminal.

A Rich or tqdm bar redraws one line in place; redirected to a file (SLURM, Kubernetes,
``nohup``) nothing readable reaches the log until the run ends. :class:`LogLineProgress` prints
a line every ``every_n_steps`` optimizer steps or ``every_n_seconds`` seconds, whichever comes
first, and one per validation instead::

    step 40/120 (33%) epoch 1/3 loss 0.6412 lr 3.62e-04 tokens/s 2,310 elapsed 0:01:05 ETA 0:02:08
    validation step 40 epoch 1: val/accuracy 0.8125, val/loss 0.4410

The CLI picks it when stdout is not a terminal (:func:`job_log_progress`); a terminal keeps
Lightning's progress bar.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ProgressBar

from .monitoring import num_tokens

__all__ = ["LogLineProgress", "job_log_progress"]


def _duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _number(value: float) -> str:
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"


class LogLineProgress(ProgressBar):
    """Plain progress lines for job logs (stdout not a terminal): every ``every_n_steps`` optimizer
    steps or ``every_n_seconds`` seconds (whichever comes first) ``step``, ``epoch``, the mean training loss since the last line, the learning rate (of
    the first parameter group), tokens/s (non-padding tokens of this process since the last line,
    times the number of processes), elapsed time and ETA (at the pace since the last line); after each validation, its metrics.
    Printed by the global-zero process only, flushed at once.

    Args:
        every_n_steps: optimizer steps between two lines (at least 1).
        every_n_seconds: at most this many seconds between two lines, at an optimizer step (a
            slow run's job log shows progress early); 0: lines by steps only.
    """

    def __init__(self, every_n_steps: int = 50, every_n_seconds: float = 30.0) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or isinstance(every_n_steps, bool) or every_n_steps < 1:
            raise ValueError(f"every_n_steps={every_n_steps!r} is not valid; use an integer >= 1")
        if isinstance(every_n_seconds, bool) or not isinstance(every_n_seconds, (int, float)) or every_n_seconds < 0:
            raise ValueError(f"every_n_seconds={every_n_seconds!r} is not valid; use a number of seconds >= 0")
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self._enabled = True
        self._reset_window()
        self._start_time = 0.0
        self._last_step = 0  # the optimizer step the last batch ended at

    # ProgressBar's interface: the learning-rate finder and non-zero ranks turn it off
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **kwargs, flush=True)

    def _reset_window(self) -> None:
        self._loss_sum: torch.Tensor | float = 0.0
        self._window_steps = 0
        self._tokens = 0
        self._window_time = time.monotonic()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_time = time.monotonic()
        self._reset_window()
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self._enabled:
            return
        self._tokens += num_tokens(batch)
        step = trainer.global_step
        if step == self._last_step:  # still accumulating gradients
            return
        loss = trainer.callback_metrics.get("train/loss_step")  # the step's loss (melora_lit.training.tasks.StepLoss)
        if isinstance(loss, torch.Tensor):  # no .item() here (no device sync per step)
            self._loss_sum = self._loss_sum + loss.detach().float()
        self._window_steps += step - self._last_step
        self._last_step = step
        late = self.every_n_seconds and time.monotonic() - self._window_time >= self.every_n_seconds
        if step % self.every_n_steps == 0 or step == trainer.max_steps or late:
            self.print(self._train_line(trainer, step))
            self._reset_window()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._enabled and self._window_steps:  # the steps since the last line
            self.print(self._train_line(trainer, trainer.global_step))
            self._reset_window()

    def _train_line(self, trainer: L.Trainer, step: int) -> str:
        now = time.monotonic()
        total = trainer.estimated_stepping_batches
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total and total != float("inf")
                 else f"step {step}"]
        epoch = trainer.current_epoch + 1
        if trainer.max_epochs and trainer.max_epochs > 0:  # past the last epoch once training ends
            epoch = f"{min(epoch, trainer.max_epochs)}/{trainer.max_epochs}"
        parts.append(f"epoch {epoch}")
        if self._window_steps and isinstance(self._loss_sum, torch.Tensor):
            parts.append(f"loss {float(self._loss_sum) / self._window_steps:.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        window = now - self._window_time
        if window > 0:
            parts.append(f"tokens/s {self._tokens * trainer.world_size / window:,.0f}")
        parts.append(f"elapsed {_duration(now - self._start_time)}")
        if self._window_steps and window > 0 and total and total != float("inf"):
            # at the pace of the last lines' steps: the first steps' warm-up does not linger
            parts.append(f"ETA {_duration(window / self._window_steps * (total - step))}")
        return " ".join(parts)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.sanity_checking:
            return
        metrics = {k: v for k, v in trainer.callback_metrics.items()
                   if k.startswith("val") and (not isinstance(v, torch.Tensor) or v.numel() == 1)}
        shown = ", ".join(f"{k} {_number(float(v))}" for k, v in sorted(metrics.items()))
        head = f"validation step {trainer.global_step} epoch {trainer.current_epoch + 1}" \
            if trainer.state.fn == "fit" else "validation"
        self.print(f"{head}: {shown}")


def job_log_progress(trainer_config: dict[str, Any], progress: LogLineProgress | None,
                     stream: Any = None) -> list[Callback]:
    """The trainer's callbacks plus :class:`LogLineProgress` where it belongs: ``stream``
    (stdout) is not a terminal, the progress bar is on, and no progress bar callback was given."""
    callbacks = trainer_config.get("callbacks") or []
    callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
    stream = sys.stdout if stream is None else stream
    wanted = trainer_config.get("enable_progress_bar") is not False and not stream.isatty()
    if progress is not None and wanted and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(progress)
    return callbacks
