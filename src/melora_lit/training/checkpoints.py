"""The checkpoint file: atomic writes, preemption saves, and safe reading.

* :class:`ResumableCheckpoint`: Lightning's ``ModelCheckpoint`` (the CLI's ``--checkpoint.*``)
  plus: writes go to a temporary file in the checkpoint folder that is renamed over the old one
  (a kill mid-save leaves the previous checkpoint whole); with ``every_n_train_steps`` the
  ``last`` checkpoint is also written at each epoch end; non-finite weights are never saved;
  on SIGTERM or SIGUSR1 it saves ``last`` after the current step and the run stops with
  :data:`EXIT_PREEMPTED`.
* :func:`check_checkpoint_file`: a checkpoint is read with ``weights_only=True`` before use; a
  truncated, foreign or unsafe file is refused in one line.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["EXIT_PREEMPTED", "ResumableCheckpoint", "check_checkpoint_file"]

#: Exit status of a run stopped by SIGTERM/SIGUSR1 after saving its ``last`` checkpoint: not 0,
#: so that a job scheduler does not take the unfinished run for a finished one.
EXIT_PREEMPTED = 3
_TMP_PREFIX = ".ckpt-tmp-"  # no "last" in the name: Lightning's own "last" search must not see it

# ----------------------------------------------------------------------------- checkpoints
def _nonfinite_parameter(module: torch.nn.Module) -> str | None:
    """Name of the first trainable parameter holding a NaN or Inf, else None."""
    for name, p in module.named_parameters():
        if p.requires_grad and not bool(torch.isfinite(p.detach()).all()):
            return name
    return None


class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) made safe to resume from; see the module doc.

    ``every_n_train_steps: N`` (with ``save_last``, the CLI's default) rewrites ``last.ckpt``
    every N optimizer steps and at the end of each epoch.
    """

    _preempt_signal: str | None = None
    _previous_usr1: Any = None
    _told = False  # the preemption message is printed once

    # -- integrity
    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        bad = _nonfinite_parameter(trainer.lightning_module)
        if bad is not None:
            # the last checkpoint must stay the last good one
            raise ValueError(f"refusing to write checkpoint {filepath} at step {trainer.global_step}: "
                             f"parameter {bad} is not finite")
        if "://" in str(filepath) and not str(filepath).startswith("file://"):
            return super()._save_checkpoint(trainer, filepath)  # remote stores: Lightning's transaction
        final = Path(filepath)
        tmp = final.with_name(f"{_TMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}")
        tmp = Path(trainer.strategy.broadcast(str(tmp)))  # one name for all ranks
        super()._save_checkpoint(trainer, str(tmp))
        self._last_checkpoint_saved = str(final)
        if trainer.is_global_zero:
            # Lightning writes through a temp file in the *system* temp folder and moves it: a
            # copy, not an atomic rename, when that is another filesystem. Here the temp file is
            # in the checkpoint folder, flushed to disk, then renamed over the old checkpoint.
            if tmp.is_file():
                with open(tmp, "rb") as f:
                    os.fsync(f.fileno())
            elif tmp.is_dir() and final.is_dir():  # a sharded (folder) checkpoint: not atomic
                shutil.rmtree(final)
            os.replace(tmp, final)
            try:  # the rename itself is durable once the folder entry is
                dir_fd = os.open(final.parent, os.O_RDONLY)
                try:
                    os.fsync(dir_fd)
                finally:
                    os.close(dir_fd)
            except OSError:
                pass
        trainer.strategy.barrier("ResumableCheckpoint._save_checkpoint")

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        # temp files of a run killed mid-save: never read, so drop them
        if trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath) and Path(self.dirpath).is_dir():
            for stale in Path(self.dirpath).glob(f"{_TMP_PREFIX}*"):
                stale.unlink(missing_ok=True)

    # -- every N steps and per epoch
    def _save_epoch_end(self, trainer: L.Trainer) -> None:
        if self._every_n_train_steps >= 1 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_epoch_end(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_epoch_end(trainer)

    # -- preemption
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._preempt_signal = None
        self._told = False
        # SIGTERM is Lightning's (trainer.received_sigterm). SIGUSR1 is installed here, after
        # Lightning registered its own handlers, so that its SLURM auto-requeue handler (when
        # there is one) still runs: ours is called after it.
        if hasattr(signal, "SIGUSR1") and _in_main_thread():
            previous = signal.getsignal(signal.SIGUSR1)
            self._previous_usr1 = previous

            def on_usr1(signum: int, frame: Any) -> None:
                self._preempt_signal = "SIGUSR1"
                if callable(previous):
                    previous(signum, frame)

            signal.signal(signal.SIGUSR1, on_usr1)
        if trainer.world_size > 1 and _in_main_thread():
            # Lightning's SIGTERM handler broadcasts from inside the handler, on whichever rank got
            # the signal: unmatched by the other ranks, that collective hangs the job. Here SIGTERM
            # only marks the run; on_train_batch_end's all-reduce stops every rank after one step.
            self._previous_term = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "_preempt_signal", "SIGTERM"))

    _previous_term: Any = None

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_usr1 is not None and _in_main_thread():
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None
        if self._previous_term is not None and _in_main_thread():
            signal.signal(signal.SIGTERM, self._previous_term)
            self._previous_term = None
        super().teardown(trainer, pl_module, stage)

    def _signal_name(self, trainer: L.Trainer) -> str | None:
        return self._preempt_signal or ("SIGTERM" if trainer.received_sigterm else None)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # every rank must agree, or the save's collectives would hang
        stop = trainer.strategy.reduce_boolean_decision(self._signal_name(trainer) is not None, all=False)
        if not stop:
            return
        self._save_preempted(trainer)
        # Lightning raises SIGTERMException right after this hook once received_sigterm is set
        trainer._signal_connector.received_sigterm = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        # a signal during validation or at an epoch end stops the run outside on_train_batch_end
        if isinstance(exception, SIGTERMException) and not trainer.sanity_checking:
            self._save_preempted(trainer)

    def _save_preempted(self, trainer: L.Trainer) -> None:
        name = self._signal_name(trainer) or "SIGTERM"
        if self._last_global_step_saved != trainer.global_step and self.save_last:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if trainer.is_global_zero and not self._told:
            self._told = True
            print(f"melora-lit: received {name}: stopped after step {trainer.global_step}, last checkpoint "
                  f"{self.last_model_path or '(none)'}; rerun with --ckpt_path last to resume "
                  f"(exit status {EXIT_PREEMPTED})", file=sys.stderr, flush=True)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ----------------------------------------------------------------------------- safe loading
def check_checkpoint_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint the safe way (``weights_only=True``: tensors and plain types only) and
    check that it is a melora-lit training checkpoint; a one-line ``ValueError`` naming the file
    and the problem otherwise."""
    file = Path(path)
    if not file.exists():
        raise ValueError(f"checkpoint not found: {path}")
    if not file.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    if file.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (an interrupted copy?)")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for the same "cannot use this file"
        text = str(err)
        if "Weights only load failed" in text or "weights_only" in text:
            # a pickled object that is not a tensor or plain value: loading it would run code
            found = re.search(r"Unsupported (?:global|operand)[: ]+(?:GLOBAL )?([\w.]+)", text)
            detail = f": it pickles {found.group(1)}" if found else ""
            raise ValueError(f"checkpoint {path} holds pickled objects other than tensors and plain values and is "
                             f"refused (it is loaded with weights_only=True){detail}") from None
        with open(file, "rb") as f:
            head = f.read(4)
        # torch.save writes a zip archive; torch's own errors for a cut one are cryptic
        if head == b"PK\x03\x04":
            raise ValueError(f"checkpoint {path} is truncated or damaged (an interrupted copy?): "
                             f"torch.load cannot read it") from None
        raise ValueError(f"checkpoint {path} is not a PyTorch checkpoint (not a torch.save zip archive)") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    if "melora" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a melora-lit checkpoint (no 'melora' entry)")
    bad = next((k for k, v in ckpt["state_dict"].items()
                if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise ValueError(f"checkpoint {path} holds non-finite values in {bad}")
    return ckpt
