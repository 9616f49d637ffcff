"""Resumable data order, with no Lightning in it (data modules and training both use it): a run
stopped at any step and resumed continues with exactly the samples of an uninterrupted run.

* :class:`ResumableSampler` (:class:`ResumableRandomSampler`, and the length-grouped order of
  instruction data): each process's share of an epoch order that is a function of ``(seed,
  epoch)``, dealt to the processes as ``DistributedSampler`` deals (so it depends on the number
  of processes too), with its position (torchdata's ``StatefulDistributedSampler``). Being a
  ``DistributedSampler``, Lightning keeps it under DDP/FSDP whatever ``use_distributed_sampler``
  says (Lightning swaps in its own sampler only for samplers that are not one).
* :class:`ResumableDataLoader`: torchdata's ``StatefulDataLoader``, whose ``state_dict`` is the
  position of the last batch handed to the training loop (with workers too, which draw indices
  batches ahead). It makes its iterator when the first batch is asked for, not when Lightning
  calls ``iter``: Lightning does that while ``configure_optimizers`` reads
  ``trainer.estimated_stepping_batches``, before a resumed run's state is loaded.

A position saved mid-epoch resumes exactly only with the number of processes that saved it
(the epoch's order depends on it): any other number is refused in one line
(:func:`check_same_data_order`). A position saved at the end of an epoch resumes on any
number, as long as an epoch keeps its number of batches (Lightning counts the next epoch's
batches from the saved count). The RNG states and the per-process positions in checkpoints are
:class:`melora_lit.training.resume.ExactResume`'s.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sized
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader
from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler

from .run import worker_init

# torchdata 0.11 calls torch.set_vital, deprecated by recent torch: a warning for every loader
# made, about torchdata's internals
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

__all__ = [
    "ResumableDataLoader",
    "ResumableRandomSampler",
    "ResumableSampler",
    "check_same_data_order",
    "mid_epoch",
]


# ----------------------------------------------------------------------------- data order
def _data_parallel(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """The number of processes that share the data and this one's rank: the default process
    group's (every melora-lit strategy is pure data parallelism: FSDP2Strategy refuses tensor
    parallelism), or 1 and 0 without one."""
    initialized = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialized else 1
    if rank is None:
        rank = dist.get_rank() if initialized else 0
    return num_replicas, rank


class _DealsEpochOrder(DistributedSampler):
    # DistributedSampler (shuffle=False) deals the positions 0..n-1 to the processes, padded to
    # a multiple of their number; each position is mapped through the epoch's order here, so
    # the dealing is DistributedSampler's own and the order is the subclass's.
    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        return (order[position] for position in super().__iter__())


class ResumableSampler(StatefulDistributedSampler, _DealsEpochOrder):
    """This process's share of an epoch order that depends only on ``seed`` and the epoch (set
    by Lightning through ``set_epoch``), resumable part-way through an epoch.

    A subclass gives the whole epoch's order in :meth:`epoch_order` (the same on every
    process); the processes take every ``num_replicas``-th index of it, the order padded as
    ``DistributedSampler`` pads it. ``num_replicas`` and ``rank``: by default those of the
    default process group, or 1 and 0. The position (``StatefulDistributedSampler``'s
    ``yielded``) is saved with the epoch, the seed and the number of processes: a position
    saved in an epoch that is over is not applied, and a mid-epoch one of another seed or
    number of processes is refused (:func:`check_same_data_order`).
    """

    def __init__(self, dataset: Sized, seed: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        num_replicas, rank = _data_parallel(num_replicas, rank)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, seed=int(seed))
        self._resume: dict[str, Any] | None = None

    def epoch_order(self) -> list[int]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[int]:
        if self._resume is not None:
            check_same_data_order(self._resume, self.seed, self.num_replicas, self.epoch)
            if self._resume.get("epoch", self.epoch) != self.epoch:
                self.next_yielded = None  # saved in an epoch that is over: this one starts at 0
            self._resume = None
        return super().__iter__()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch, "seed": self.seed,
                "num_replicas": self.num_replicas, "num_samples": self.num_samples}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._resume = dict(state_dict)


class ResumableRandomSampler(ResumableSampler):
    """A random order of ``data_source`` that depends only on ``seed`` and the epoch."""

    def __init__(self, data_source: Sized, seed: int, num_replicas: int | None = None,
                 rank: int | None = None) -> None:
        super().__init__(data_source, seed, num_replicas, rank)
        self.data_source = data_source

    def epoch_order(self) -> list[int]:
        # a fresh generator per epoch: the order never depends on how many epochs this process
        # ran; seeds far apart, so that (seed, epoch + 1) and (seed + 1, epoch) differ
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.data_source), generator=generator).tolist()


def mid_epoch(position: dict[str, Any], epoch: int | None = None) -> bool:
    """Whether a saved position is part-way through its epoch (and that epoch is ``epoch``)."""
    yielded, total = int(position.get("yielded", 0)), int(position.get("num_samples", 0) or 0)
    return yielded > 0 and (not total or yielded < total) and (epoch is None or position.get("epoch", epoch) == epoch)


def check_same_data_order(position: dict[str, Any], seed: int, num_replicas: int, epoch: int | None = None,
                          epoch_batches: int | None = None) -> None:
    """Refuse (one-line ``ValueError``) to resume a saved loader ``position`` (a
    :class:`ResumableDataLoader`'s ``state_dict()["sampler"]``) where the run would not continue
    exactly: mid-epoch with another data seed or number of processes (the rest of the epoch
    would not be the rest of the same order); at the end of an epoch with another number of
    batches per epoch (Lightning counts the batches of the next epoch from the saved count, so
    it would cut that epoch short). ``epoch``: the epoch being resumed, ``epoch_batches``: its
    number of batches, where known."""
    yielded, total = int(position.get("yielded", 0)), position.get("num_samples", "?")
    saved = int(position.get("num_replicas", 1))
    processes = f"{saved} process{'es' if saved != 1 else ''}"
    if mid_epoch(position, epoch):
        saved_seed = position.get("seed", seed)
        if saved_seed != seed:
            raise ValueError(f"the checkpoint's data order has seed {saved_seed}, this run's seed is {seed}: "
                             "pass the same --data.seed to resume")
        if saved != num_replicas:
            raise ValueError(
                f"the checkpoint was saved mid-epoch (epoch {position.get('epoch', '?')}, {yielded} of {total} "
                f"samples per process) by {processes} and this run has {num_replicas}: the epoch's data order "
                f"depends on the number of processes; resume with {saved} (--trainer.devices x "
                "--trainer.num_nodes) or from a checkpoint saved at the end of an epoch")
        return
    batch_size = position.get("batch_size")
    if epoch_batches is None or not batch_size or not yielded:
        return
    saved_batches = -(-int(total) // int(batch_size))
    if saved_batches != epoch_batches:
        raise ValueError(
            f"the checkpoint was saved at the end of an epoch of {saved_batches} batches per process ({processes}, "
            f"batch size {batch_size}) and this run's epochs have {epoch_batches}: Lightning would cut the next "
            f"epoch short; keep {saved_batches} batches per epoch (per-process batch size x processes = "
            f"{int(batch_size) * saved}) or resume with the same processes and batch size")


class _OnFirstBatch(Iterator[Any]):
    """An iterator that makes the real one when the first batch is asked for."""

    def __init__(self, loader: ResumableDataLoader) -> None:
        self._loader = loader
        self._batches: Iterator[Any] | None = None

    def __iter__(self) -> _OnFirstBatch:
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches = self._loader._start()
        return next(self._batches)


class ResumableDataLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` for a :class:`ResumableSampler`, whose state Lightning
    (and :class:`ExactResume`, per process) saves with each checkpoint.

    Its ``state_dict`` is torchdata's (the position after the last batch handed out, with
    workers too) plus ``"sampler"``: that position in plain words (epoch, samples per process
    handed out, seed, number of processes, workers), read to check a resume before it starts.
    With another number of workers than saved, the position is applied to the sampler alone
    (the datasets here have no per-worker state).
    """

    _position: dict[str, Any] | None = None  # after the last batch handed out
    _resumed: dict[str, Any] | None = None  # the position loaded, until the next pass starts

    def __init__(self, *args: Any, worker_init_fn: Callable[[int], Any] | None = None, **kwargs: Any) -> None:
        # its workers ignore the signals a scheduler sends the process group; a given function still runs
        super().__init__(*args, worker_init_fn=worker_init(worker_init_fn), **kwargs)

    def __iter__(self) -> Iterator[Any]:
        # Lightning calls iter() while configure_optimizers counts the steps, before a resumed
        # run's state is loaded; with workers the iterator would already have drawn indices
        return _OnFirstBatch(self)

    def _start(self) -> Iterator[Any]:
        sampler = self.sampler
        batches = super().__iter__()
        if not isinstance(sampler, ResumableSampler) or self.batch_size is None:
            return batches
        start = 0
        if self._resumed and self._resumed.get("epoch") == sampler.epoch:
            start = int(self._resumed.get("yielded", 0))
        self._resumed = None
        self._position = self._describe(sampler.epoch, start)
        return self._counted(batches, start)

    def _counted(self, batches: Iterator[Any], start: int) -> Iterator[Any]:
        epoch = self.sampler.epoch
        for count, batch in enumerate(batches, start=1):
            self._position = self._describe(epoch, start + count * self.batch_size)
            yield batch

    def _describe(self, epoch: int, yielded: int) -> dict[str, Any]:
        sampler = self.sampler
        return {"epoch": int(epoch), "yielded": min(int(yielded), sampler.num_samples), "seed": sampler.seed,
                "num_replicas": sampler.num_replicas, "num_samples": sampler.num_samples,
                "batch_size": self.batch_size, "num_workers": self.num_workers}

    def state_dict(self) -> dict[str, Any]:
        if not isinstance(self.sampler, ResumableSampler):
            return super().state_dict()
        if self._position is None:  # no batch yet: the start of the sampler's epoch
            return {"sampler": self._describe(self.sampler.epoch, 0)}
        return {**super().state_dict(), "sampler": dict(self._position)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        position = state_dict.get("sampler") if isinstance(self.sampler, ResumableSampler) else None
        if position is None:
            return super().load_state_dict(state_dict)
        self._resumed = dict(position)
        loader_state = {k: v for k, v in state_dict.items() if k != "sampler"}
        if loader_state and position.get("num_workers") == self.num_workers:
            super().load_state_dict(loader_state)  # torchdata's: sampler, workers' seeds, datasets
        else:  # another worker count (or no batch yet): the sampler's position alone
            super().load_state_dict({})
            self.sampler.load_state_dict({"yielded": 0, **position})
