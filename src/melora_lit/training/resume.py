"""Exact resume: the train order is a function of ``(seed, epoch)``, the loader's position and
every RNG state go into each checkpoint.

* :class:`ResumableRandomSampler` / :class:`ResumableDataLoader`: the train order is a function
  of ``(seed, epoch)`` and the loader's position is saved in every checkpoint (Lightning saves
  and restores the state of a loader with ``state_dict``/``load_state_dict``), so a run resumed
  mid-epoch sees exactly the samples the interrupted run had not seen yet.
* :class:`ExactResume`: the torch (CPU and CUDA), numpy and Python RNG states go into every
  checkpoint and come back before the first resumed step (Lightning saves none of them), so
  dropout draws the same masks as in an uninterrupted run; and the loader's position is
  applied (see the class).
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, RandomSampler

__all__ = ["ExactResume", "ResumableDataLoader", "ResumableRandomSampler", "ResumableSampler"]

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
