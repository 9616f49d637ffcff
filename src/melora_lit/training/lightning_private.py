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
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_should_save_on_train_epoch_end"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_monitor_candidates"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_topk_checkpoint"),
    ("lightning.pytorch.callbacks.ModelCheckpoint", "_save_last_checkpoint"),
]


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


# ----------------------------------------------------------------------------- monitoring
# BestMetricHParams (melora_lit.training.monitoring) writes the one hparams summary of a run, with
# the data module's hyperparameters where Lightning would log them: when it called
# ``save_hyperparameters(logger=True)``, which Lightning records in a flag with no public reader.
PRIVATE_MEMBERS += [("lightning.pytorch.LightningDataModule", "_log_hyperparams")]


def logs_hyperparameters(obj: Any) -> bool:
    """Whether ``obj`` (a LightningDataModule) asked for its hyperparameters to be logged."""
    return bool(getattr(obj, "_log_hyperparams", False))


# TokenThroughputMonitor (melora_lit.training.monitoring) is Lightning's ThroughputMonitor, which
# warns at the first batch of a module without ``flops_per_batch`` (every MELoRA module): it
# decides that once, in a flag that is set beforehand here.
PRIVATE_MEMBERS += [("lightning.pytorch.callbacks.ThroughputMonitor", "_module_has_flops")]


def throughput_flops_if_given(callback: Any, pl_module: Any) -> None:
    """ThroughputMonitor: FLOPs only when ``pl_module`` gives them, with no warning when it does not."""
    callback._module_has_flops = hasattr(pl_module, "flops_per_batch")


# ----------------------------------------------------------------------------- strategies
# FSDP2Strategy and FSDPStrategy (melora_lit.training.strategies) subclass Lightning's
# ModelParallelStrategy and FSDPStrategy. Two settings they must change after the constructor
# live in private attributes with no public writer: the data-parallel size ("auto" until the
# environment is known) and FSDP1's activation-checkpointing policy (the layer classes are known
# only once the model is built); and FSDP1 wraps the model in ``_setup_model``, the one hook that
# runs before wrapping. (The settings they only read, they keep from their own constructor.)
PRIVATE_MEMBERS += [
    ("lightning.pytorch.strategies.ModelParallelStrategy", "_data_parallel_size"),
    ("lightning.pytorch.strategies.FSDPStrategy", "_activation_checkpointing_kwargs"),
    ("lightning.pytorch.strategies.FSDPStrategy", "_setup_model"),
]


def resolve_data_parallel_size(strategy: Any) -> None:
    """ModelParallelStrategy: ``data_parallel_size="auto"`` becomes every process."""
    if strategy._data_parallel_size == "auto":
        strategy._data_parallel_size = strategy.num_nodes * strategy.num_processes


def fsdp_set_activation_checkpointing(strategy: Any, kwargs: dict[str, Any]) -> None:
    """FSDPStrategy: the activation-checkpointing policy, unless the user gave one."""
    if not strategy._activation_checkpointing_kwargs:
        strategy._activation_checkpointing_kwargs = kwargs


class BeforeFSDPWrap:
    """FSDPStrategy mixin (before Lightning's class in the bases): ``before_fsdp_wrap(model)``
    runs right before Lightning wraps ``model``."""

    def before_fsdp_wrap(self, model: Any) -> None:
        pass

    def _setup_model(self, model: Any) -> Any:
        self.before_fsdp_wrap(model)
        return super()._setup_model(model)
