"""Every private Lightning member melora-lit touches, in this one place.

Lightning keeps no promise about names that start with an underscore: an upgrade can rename or
drop them. So nothing else in melora-lit reaches into ``trainer._x`` or ``loop._y``: it calls the
small functions below, each of which says why no public API does the job. ``pyproject.toml``
pins Lightning to the range these were tested with, and ``tests/test_lightning_private.py``
checks that every member listed in :data:`PRIVATE_MEMBERS` still exists, with a message naming
the one that disappeared.
"""

from __future__ import annotations

from typing import Any

#: (where, attribute) of each private member used below; the test checks each one.
PRIVATE_MEMBERS: list[tuple[str, str]] = []


# ----------------------------------------------------------------------------- checkpoints
# ResumableCheckpoint (melora_lit.training.checkpoints) writes top-k and ``last`` at each epoch
# end when it checkpoints every N steps, and ``last`` on preemption. ModelCheckpoint makes
# every_n_train_steps and every_n_epochs mutually exclusive and has no public "save now": its
# own save methods keep best_k_models, last_model_path and the version counter right.
PRIVATE_MEMBERS += [
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_every_n_train_steps"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_should_save_on_train_epoch_end"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_monitor_candidates"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_topk_checkpoint"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_last_checkpoint"),
]


def checkpoint_every_n_train_steps(callback: Any) -> int:
    """``every_n_train_steps`` as the callback resolved it (0: not step-based)."""
    return int(callback._every_n_train_steps)


def saves_on_train_epoch_end(callback: Any, trainer: Any) -> bool:
    """Whether ``callback`` saves at the train epoch end (else after validation), as Lightning
    decides it from ``save_on_train_epoch_end`` and the validation schedule."""
    return bool(callback._should_save_on_train_epoch_end(trainer))


def save_topk_and_last(callback: Any, trainer: Any) -> None:
    """Save the top-k candidate and ``last`` now, as ModelCheckpoint does at its own triggers."""
    candidates = callback._monitor_candidates(trainer)
    callback._save_topk_checkpoint(trainer, candidates)
    callback._save_last_checkpoint(trainer, candidates)


def save_last(callback: Any, trainer: Any) -> None:
    """Save ``last`` now (a collective: every rank calls it)."""
    callback._save_last_checkpoint(trainer, callback._monitor_candidates(trainer))


# ----------------------------------------------------------------------------- strategies
# FSDP2Strategy and FSDPStrategy (melora_lit.training.strategies) subclass Lightning's
# ModelParallelStrategy and FSDPStrategy. Their settings live in private attributes with no
# public reader: the data-parallel size ("auto" until the environment is known), whether a
# checkpoint is saved as a sharded folder, FSDP1's state-dict type and activation-checkpointing
# policy; and FSDP1 wraps the model in ``_setup_model``, the one hook that runs before wrapping.
PRIVATE_MEMBERS += [
    ("lightning.pytorch.strategies.ModelParallelStrategy", "_data_parallel_size"),
    ("lightning.pytorch.strategies.ModelParallelStrategy", "_save_distributed_checkpoint"),
    ("lightning.pytorch.strategies.FSDPStrategy", "_state_dict_type"),
    ("lightning.pytorch.strategies.FSDPStrategy", "_activation_checkpointing_kwargs"),
    ("lightning.pytorch.strategies.FSDPStrategy", "_setup_model"),
]


def resolve_data_parallel_size(strategy: Any) -> None:
    """ModelParallelStrategy: ``data_parallel_size="auto"`` becomes every process."""
    if strategy._data_parallel_size == "auto":
        strategy._data_parallel_size = strategy.num_nodes * strategy.num_processes


def saves_distributed_checkpoint(strategy: Any) -> bool:
    """ModelParallelStrategy: whether checkpoints are sharded folders (``save_distributed_checkpoint``)."""
    return bool(strategy._save_distributed_checkpoint)


def fsdp_state_dict_type(strategy: Any) -> str:
    """FSDPStrategy: ``state_dict_type`` (``full`` or ``sharded``)."""
    return str(strategy._state_dict_type)


def fsdp_set_activation_checkpointing(strategy: Any, kwargs: dict[str, Any]) -> None:
    """FSDPStrategy: the activation-checkpointing policy, unless the user gave one."""
    if not strategy._activation_checkpointing_kwargs:
        strategy._activation_checkpointing_kwargs = kwargs


def fsdp_setup_model(strategy_class: type, strategy: Any, model: Any) -> Any:
    """FSDPStrategy: Lightning's own wrapping of ``model`` (the parent's ``_setup_model``)."""
    return super(strategy_class, strategy)._setup_model(model)
