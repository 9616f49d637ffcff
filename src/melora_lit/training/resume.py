"""Exact resume, on one process and on many: a run stopped at any step and resumed continues
with exactly the samples, dropout masks and optimizer state of an uninterrupted run.

The data order and the loader's position are :mod:`melora_lit.loading`'s
(:class:`~melora_lit.loading.ResumableSampler`, :class:`~melora_lit.loading.ResumableDataLoader`).
:class:`ExactResume`: every checkpoint holds, for every process, the torch (CPU and CUDA),
numpy and Python RNG states and the train loader's position, gathered to rank 0 (which writes
the checkpoint); on resume each process takes its own back right before the first step.

A checkpoint saved mid-epoch resumes exactly only with the number of processes that saved it
(the epoch's order depends on it): any other number is refused in one line
(:func:`~melora_lit.loading.check_same_data_order`). A checkpoint saved at the end of an epoch
resumes on any number, as long as an epoch keeps its number of batches (Lightning counts the next
epoch's batches from the saved count).
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback

from ..loading import ResumableDataLoader, check_same_data_order, mid_epoch

__all__ = ["ExactResume", "check_resume_checkpoint", "check_resume_data"]


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


# ----------------------------------------------------------------------------- the callback
def _gather(value: Any) -> list[Any]:
    """``value`` of every process, by rank (a collective when there are several)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class ExactResume(Callback):
    """Saves each process's RNG states (torch CPU and CUDA, numpy, Python) and train loader
    position in every checkpoint, gathered to rank 0 (a collective: every rank saves
    checkpoints together, as Lightning's checkpointing requires anyway); when training resumes,
    each process takes its own back right before the first step (nothing in between may draw
    from the RNGs). Lightning saves no RNG state, and the loader state it saves is rank 0's.

    A checkpoint saved mid-epoch by another number of processes is refused in one line.
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._trainer: L.Trainer | None = None

    @property
    def state_key(self) -> str:
        return "ExactResume"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer  # state_dict() gets no trainer; the loader is the trainer's

    def _train_loader(self) -> ResumableDataLoader | None:
        trainer = self._trainer
        loader = trainer.train_dataloader if trainer is not None else None
        return loader if isinstance(loader, ResumableDataLoader) else None

    def state_dict(self) -> dict[str, Any]:
        loader = self._train_loader()
        mine = {"rng": _rng_state(), "train_loader": loader.state_dict() if loader is not None else None}
        ranks = _gather(mine)
        return {"world_size": len(ranks), "ranks": ranks}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict) if state_dict else None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        state, self._pending = self._pending, None
        if not state:
            return
        if "ranks" not in state:  # a checkpoint of one process from before per-rank states
            state = {"world_size": 1, "ranks": [{"rng": state.get("rng"), "train_loader": None}]}
        ranks = state["ranks"]
        loader = self._train_loader()
        mine = ranks[trainer.global_rank] if trainer.global_rank < len(ranks) else None
        if loader is not None and (ranks[0] or {}).get("train_loader"):
            # every rank checks the same (rank 0's) position, so that all refuse together
            position = ranks[0]["train_loader"].get("sampler") or {}
            check_same_data_order(position, loader.sampler.seed, loader.sampler.num_replicas, trainer.current_epoch,
                                  len(loader))
            if mine is not None and mid_epoch(position, trainer.current_epoch):  # else the epoch starts at 0
                loader.load_state_dict(mine["train_loader"])
        if mine is not None and mine.get("rng") is not None:
            _set_rng_state(mine["rng"])  # another number of processes: the new ones keep fresh seeds


def check_resume_data(ckpt: dict[str, Any], loader: Any, world_size: int) -> None:
    """Before a run resumes from ``ckpt`` (as read) with ``world_size`` processes and this run's
    training ``loader`` (made before any process group exists): refuse it in one line if the
    epoch order or length would differ (:func:`check_same_data_order`), so that the resumed
    folder is not written to. :class:`ExactResume` checks again when training starts."""
    position = _saved_position(ckpt)
    if not position or not isinstance(loader, ResumableDataLoader) or not loader.batch_size:
        return
    samples = -(-len(loader.sampler.dataset) // world_size)  # DistributedSampler's share, padded
    batches = samples // loader.batch_size if loader.drop_last else -(-samples // loader.batch_size)
    check_same_data_order(position, loader.sampler.seed, world_size, None, batches)


def check_resume_checkpoint(ckpt: dict[str, Any], world_size: int) -> None:
    """Before a run resumes from the checkpoint ``ckpt`` (as read) with ``world_size`` processes:
    refuse it in one line if it was saved mid-epoch by another number of processes (so that
    nothing is started, logged or written). Anything else is checked when training starts."""
    position = _saved_position(ckpt)
    if position:
        check_same_data_order(position, position.get("seed"), world_size)


def _saved_position(ckpt: dict[str, Any]) -> dict[str, Any] | None:
    """Rank 0's loader position in a checkpoint (as read), as :class:`ResumableDataLoader` saves it."""
    ranks = (ckpt.get("callbacks", {}).get("ExactResume") or {}).get("ranks") or []
    return ((ranks[0] or {}).get("train_loader") or {}).get("sampler") if ranks else None
