"""Nothing lost: exact resume, preemption, checkpoint integrity and a non-finite guard.

* :class:`ResumableRandomSampler` / :class:`ResumableDataLoader`: the train order is a function
  of ``(seed, epoch)`` and the loader's position is saved in every checkpoint (Lightning saves
  and restores the state of a loader with ``state_dict``/``load_state_dict``), so a run resumed
  mid-epoch sees exactly the samples the interrupted run had not seen yet.
* :class:`ExactResume`: the torch (CPU and CUDA), numpy and Python RNG states go into every
  checkpoint and come back before the first resumed step (Lightning saves none of them), so
  dropout draws the same masks as in an uninterrupted run; and the loader's position is
  applied (see the class).
* :class:`ResumableCheckpoint`: Lightning's ``ModelCheckpoint`` (the CLI's ``--checkpoint.*``)
  plus: writes go to a temporary file in the checkpoint folder that is renamed over the old one
  (a kill mid-save leaves the previous checkpoint whole); with ``every_n_train_steps`` the
  ``last`` checkpoint is also written at each epoch end; non-finite weights are never saved;
  on SIGTERM or SIGUSR1 it saves ``last`` after the current step and the run stops with
  :data:`EXIT_PREEMPTED`.
* :class:`NonFiniteGuard` (the CLI's ``--nan_guard.*``): a non-finite loss or gradient stops the
  run before the optimizer step (the last checkpoint stays the last good one), or, with
  ``action: skip``, that step is skipped and counted as ``train/skipped_steps``.
* :func:`check_checkpoint_file`: a checkpoint is read with ``weights_only=True`` before use; a
  truncated, foreign or unsafe file is refused in one line.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, Iterator, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader, RandomSampler

__all__ = [
    "EXIT_PREEMPTED",
    "NonFiniteError",
    "NonFiniteGuard",
    "ExactResume",
    "ResumableCheckpoint",
    "ResumableDataLoader",
    "ResumableRandomSampler",
    "ResumableSampler",
    "check_checkpoint_file",
]

#: Exit status of a run stopped by SIGTERM/SIGUSR1 after saving its ``last`` checkpoint: not 0,
#: so that a job scheduler does not take the unfinished run for a finished one.
EXIT_PREEMPTED = 3
_TMP_PREFIX = ".ckpt-tmp-"  # no "last" in the name: Lightning's own "last" search must not see it


# ----------------------------------------------------------------------------- data order
class ResumableSampler:
    """What makes a sampler resumable (a mixin): its order is a function of ``seed`` and the
    epoch (set by Lightning through :meth:`set_epoch`) given by :meth:`epoch_order`, and it can
    start part-way through an epoch (:meth:`load_state_dict`). A subclass sets ``seed`` and
    calls :meth:`_init_position`."""

    seed: int
    epoch: int

    def _init_position(self) -> None:
        self.epoch = 0
        self._yielded = 0  # indices handed out in the current epoch
        self._started = {"epoch": 0, "start": 0}
        self._resume: dict[str, int] | None = None

    def epoch_order(self) -> list[int]:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        start = 0
        if self._resume is not None and self._resume.get("epoch") == self.epoch:
            start = min(int(self._resume.get("yielded", 0)), len(order))
        self._resume = None
        self._yielded = start
        self._started = {"epoch": self.epoch, "start": start}  # where this pass began
        for index in order[start:]:
            self._yielded += 1  # drawn, not yet trained on: ResumableDataLoader counts those
            yield index

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "yielded": self._yielded, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the checkpoint's data order has seed {state.get('seed')}, this run's seed is "
                             f"{self.seed}: pass the same --data.seed to resume")
        self._resume = dict(state)


class ResumableRandomSampler(ResumableSampler, RandomSampler):
    """A random order of ``data_source`` that depends only on ``seed`` and the epoch, and that
    can start part-way through an epoch.

    It subclasses ``RandomSampler`` so that under DDP Lightning swaps in its
    ``DistributedSampler`` exactly as before.
    """

    def __init__(self, data_source: Any, seed: int) -> None:
        RandomSampler.__init__(self, data_source)
        self.seed = int(seed)
        self._init_position()

    def epoch_order(self) -> list[int]:
        # a fresh generator per epoch: the order never depends on how many epochs this process ran
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning saves with each checkpoint and restores on resume
    (it checks for ``state_dict``/``load_state_dict``), when its sampler is a
    :class:`ResumableSampler`. Under DDP Lightning replaces the sampler: its state is then
    empty and the run resumes at the start of the epoch's remaining batches in a new order."""

    def __iter__(self) -> Iterator[Any]:
        if not isinstance(self.sampler, ResumableSampler) or self.batch_size is None:
            return super().__iter__()
        return self._counted(super().__iter__())

    def _counted(self, batches: Iterator[Any]) -> Iterator[Any]:
        # The position counts batches handed to the training loop, not indices the sampler gave
        # out (with workers it runs batches ahead); its start is read once the sampler has begun
        # (lazily without workers: Lightning creates the iterator before it loads the state).
        sampler = self.sampler
        total = len(sampler)
        for count, batch in enumerate(batches, start=1):
            began = sampler._started
            self._position = {"epoch": began["epoch"], "yielded": min(began["start"] + count * self.batch_size, total),
                              "seed": sampler.seed}
            yield batch

    def state_dict(self) -> dict[str, Any]:
        sampler = self.sampler
        if not isinstance(sampler, ResumableSampler):
            return {}
        return {"sampler": dict(getattr(self, "_position", None) or sampler.state_dict())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("sampler") and isinstance(self.sampler, ResumableSampler):
            self.sampler.load_state_dict(state["sampler"])


# ----------------------------------------------------------------------------- RNG state
def _rng_state() -> dict[str, Any]:
    """Every global RNG state as plain types and tensors (so ``weights_only=True`` loads it)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                  "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": int(version), "internal": list(internal), "gauss": gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():  # another machine shape: keep the fresh seeds
            torch.cuda.set_rng_state_all(cuda)


class ExactResume(Callback):
    """Saves the torch, CUDA, numpy and Python RNG states in every checkpoint and, when training
    resumes, restores them right before the first step (nothing in between may draw from them).

    It also hands the train loader its saved position: Lightning restores loader states only
    when it builds the train loader after restoring the loops, but ``configure_optimizers``
    (``trainer.estimated_stepping_batches``) builds it earlier, so Lightning's pending states
    would never be applied.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        return "ExactResume"

    def state_dict(self) -> dict[str, Any]:
        return {"rng": _rng_state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict.get("rng") if state_dict else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loop = trainer.fit_loop
        states = getattr(loop, "_combined_loader_states_to_load", None)
        if states and loop._combined_loader is not None:
            loop._combined_loader._load_state_dicts(states)
            loop._combined_loader_states_to_load = []
            # The iterator already exists (made with the loader, before the state was loaded),
            # and one with workers has drawn indices from the start of epoch 0: make it again,
            # for the epoch being resumed. The loop draws the first batch later.
            for loader in loop._combined_loader.flattened:
                _set_sampler_epoch(loader, loop.epoch_progress.current.processed)
            if loop._data_fetcher is not None:
                iter(loop._data_fetcher)
        if self._pending is not None:
            _set_rng_state(self._pending)
            self._pending = None


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

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous_usr1 is not None and _in_main_thread():
            signal.signal(signal.SIGUSR1, self._previous_usr1)
            self._previous_usr1 = None
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


# ----------------------------------------------------------------------------- non-finite guard
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
        path = getattr(cb, "last_model_path", "") or getattr(cb, "_last_checkpoint_saved", "")
        if path:
            return str(path)
    return None


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
