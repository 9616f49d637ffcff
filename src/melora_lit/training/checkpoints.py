"""The checkpoint format, in one place: what is saved, how it is validated, read, written, and
loaded by a run or by ``export``.

* **What is saved**: Lightning's checkpoint with only the trainable state (adapter and
  ``modules_to_save``) in ``state_dict`` and a ``melora`` entry (config, base model, label
  names, version). ``MELoRAModule`` records the keys and shapes before sharding
  (:func:`record_adapter_shapes`) and its ``on_save_checkpoint``/``on_load_checkpoint`` hooks
  call :func:`save_adapter_state` and :func:`load_adapter_state`.
* **How it is validated**: :func:`check_state_shapes` (keys and shapes, one line naming the first
  mismatch), :func:`check_resume` (a checkpoint resumed by ``fit`` has this run's model settings
  and data seed), :func:`check_fingerprints` (and its data and backbone, as
  :class:`RunFingerprint` recorded them): checked before anything is written.
* **How it is read**: :func:`read_checkpoint` (``weights_only=True``; a file, or the folder of a
  sharded FSDP checkpoint); a truncated, foreign, unsafe or non-finite checkpoint is refused in one
  line. Every reader (``fit``/``validate``/... ``--ckpt_path``, the strategies, ``export``) goes
  through it.
* **How it is written**: :class:`AtomicCheckpointIO`, a Lightning ``CheckpointIO`` plugin: one write,
  to a temporary file in the checkpoint folder, flushed to disk and renamed over the old file.
* **How a run loads it**: :class:`ResumableCheckpoint` (``--checkpoint.*``) and the CLI's
  ``--ckpt_path``; ``export`` with :func:`load_module`.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .. import __version__
from ..errors import EXIT_PREEMPTED  # (re-exported: its home is errors)
from ..fingerprint import backbone_fingerprint, fingerprint_changes
from ..run import preemption, remove_stale_temp_files, staged
from . import lightning_private
from .tasks import task_class, task_names

__all__ = [
    "EXIT_PREEMPTED",
    "AtomicCheckpointIO",
    "ResumableCheckpoint",
    "RunFingerprint",
    "check_fingerprints",
    "check_resume",
    "check_state_shapes",
    "load_adapter_state",
    "load_module",
    "read_checkpoint",
    "record_adapter_shapes",
    "refuse_code_settings",
    "save_adapter_state",
]

#: The file of a sharded checkpoint folder that holds all but the sharded tensors (Lightning's name).
SHARDED_METADATA = "meta.pt"


# ----------------------------------------------------------------------------- what is saved
def record_adapter_shapes(module: L.LightningModule, model: torch.nn.Module) -> None:
    """Record the checkpoint's keys and shapes (``module._checkpoint_shapes``): the adapter's
    tensors (:func:`~melora_lit.adapter.inject.adapter_state_dict`). Call it before sharding,
    which splits the tensors (FSDP2) or renames the modules (FSDP1)."""
    from ..adapter import adapter_state_dict

    state = adapter_state_dict(model, module.summary.modules_to_save)
    module._checkpoint_shapes = {"model." + k: tuple(v.shape) for k, v in state.items()}


def save_adapter_state(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """``on_save_checkpoint``: keep only the adapter and the saved modules (a MiniLM checkpoint is
    ~1 MB, not ~90 MB; the strategies of :mod:`melora_lit.training.strategies` gather them to full
    tensors on rank 0) and add the ``melora`` entry."""
    keep = module._checkpoint_shapes
    if not any(type(v).__name__ in ("DTensor", "ShardedTensor") for v in checkpoint["state_dict"].values()):
        # (a sharded checkpoint folder keeps Lightning's format, the whole model: it loads it whole)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
    checkpoint["melora"] = {
        "config": module.melora_config.to_dict(),
        "base_model_name_or_path": module.hparams.model_name_or_path,
        "label_names": module.label_names,
        "melora_lit_version": __version__,
    }


def load_adapter_state(module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
    """``on_load_checkpoint``: validate the adapter state against the recorded shapes and load it
    (sharded back under FSDP), and take the label names. Lightning's own FSDP and ModelParallel
    strategies load (and pop) the state dict themselves; those of
    :mod:`melora_lit.training.strategies` leave it here."""
    from ..adapter import load_adapter_state_dict
    from .sharded_state import is_sharded, load_full_state

    if "state_dict" in checkpoint:
        state = {k: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        check_state_shapes({k[len("model."):]: v for k, v in state.items()},
                           {k[len("model."):]: s for k, s in module._checkpoint_shapes.items()})
        trainer = attached_trainer(module)
        if trainer is not None and is_sharded(trainer.strategy.model):
            load_full_state(module.trainer.strategy.model, state)  # each rank keeps its shard
        else:
            load_adapter_state_dict(module.model, {k[len("model."):]: v for k, v in state.items()},
                                    module.summary.modules_to_save)
    meta = checkpoint.get("melora", {})
    if meta.get("label_names") and not module.label_names:
        module.label_names = list(meta["label_names"])


def attached_trainer(module: L.LightningModule) -> L.Trainer | None:
    try:
        return module.trainer  # Lightning raises when the module is not attached (export)
    except RuntimeError:
        return None


# ----------------------------------------------------------------------------- validation
def check_state_shapes(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> None:
    """Raise a one-line ``ValueError`` naming the first missing, unexpected or misshaped key."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    other = "; it was saved from a different model or MELoRA config"
    if missing:
        what = f"it is missing key {missing[0]!r} ({len(missing)} missing in all){other}"
    elif unexpected:
        what = f"it has unexpected key {unexpected[0]!r} ({len(unexpected)} in all){other}"
    elif misshaped:
        k = misshaped[0]
        what = f"adapter key {k!r}: expected shape {tuple(expected[k])}, found {tuple(state[k].shape)}"
    else:
        return
    raise ValueError(f"checkpoint does not fit this model: {what}")


# what decides the checkpoint's keys, shapes and meaning
_RESUME_SETTINGS = ("task", "num_labels", "label_names", "melora", "gguf_file")
# what the checkpoint's optimizer and scheduler state hold, restored over this run's values: a
# different value typed for a resume would be silently dropped, so it is refused
_RESTORED_SETTINGS = ("learning_rate", "head_learning_rate", "weight_decay", "adam_betas", "adam_eps")


def _differences(saved: Any, current: Any, name: str) -> list[str]:
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        return [d for k in sorted(set(saved) | set(current)) for d in
                _differences(saved.get(k), current.get(k), f"{name}.{k}")]
    if isinstance(saved, (list, tuple)) and isinstance(current, (list, tuple)):
        saved, current = list(saved), list(current)
    return [] if saved == current else [f"{name}={saved!r}, this run sets {name}={current!r}"]


def check_resume(path: str | os.PathLike, checkpoint: Mapping[str, Any], model_hparams: Mapping[str, Any],
                 data_seed: int | None) -> None:
    """Refuse (one-line ``ValueError``) to resume ``checkpoint`` into a run whose model settings or
    data seed differ from the ones it was trained with; the CLI calls it before it writes
    anything, so a refused resume leaves the run folder as it was."""
    saved = dict(checkpoint.get("hyper_parameters") or {})
    current = {k: (v.to_dict() if hasattr(v, "to_dict") else v) for k, v in dict(model_hparams).items()}
    task = saved.get("task", current.get("task"))
    unused = task_class(task).unused_settings if task is None or task in task_names() else ()
    keys = [k for k in _RESUME_SETTINGS if (k in saved or k in current) and k not in unused]
    diffs = [d for k in keys for d in _differences(saved.get(k), current.get(k), k)]
    if diffs:
        raise ValueError(f"checkpoint {path} does not fit this run: it was trained with {diffs[0]}; resume with "
                         f"the run's own settings (its config.yaml), or start a new run without --ckpt_path")
    restored = [d for k in _RESTORED_SETTINGS if k in saved
                for d in _differences(saved.get(k), current.get(k), k)]
    if restored:
        raise ValueError(f"checkpoint {path} was trained with {restored[0]}: a resume continues the checkpoint's "
                         f"optimizer and schedule, which hold its value; resume with the run's own settings (its "
                         f"config.yaml), or start a new run without --ckpt_path to train with another")
    loaders = (((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("state_dict") or {}).get("combined_loader")
    seeds = [s["sampler"]["seed"] for s in loaders or [] if isinstance(s, dict) and "seed" in (s.get("sampler") or {})]
    if data_seed is not None and seeds and seeds[0] != data_seed:
        raise ValueError(f"checkpoint {path} was trained with data seed {seeds[0]}, this run's is {data_seed}: pass "
                         f"--data.init_args.seed {seeds[0]} to resume (the data order depends on it)")


_FINGERPRINT_KEY = "RunFingerprint"  # its entry in a checkpoint's "callbacks"


class RunFingerprint(Callback):
    """Records in every checkpoint what the run trains on (:mod:`melora_lit.fingerprint`): the
    data module's ``data_fingerprint()`` (each split's files, rows and settings) and the
    backbone's config and weights, measured once per command (the CLI measures before it checks
    a resume, :func:`check_fingerprints`; the record is then this run's, an accepted change
    included)."""

    def __init__(self) -> None:
        self.measured: dict[str, Any] | None = None
        self._module: L.LightningModule | None = None

    @property
    def state_key(self) -> str:
        return _FINGERPRINT_KEY

    def measure(self, datamodule: Any, module: L.LightningModule) -> dict[str, Any]:
        """``{"data": ..., "backbone": ...}`` of this run (its data set up for ``fit``)."""
        from ..data.base import MELoRADataModule

        if self.measured is None:
            self._module = module
            data = datamodule.data_fingerprint() if isinstance(datamodule, MELoRADataModule) else {}
            self.measured = {"data": data, "backbone": _backbone_fingerprint(module)}
        return self.measured

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.measure(trainer.datamodule, pl_module)

    def state_dict(self) -> dict[str, Any]:
        if self.measured is None:
            return {}
        if not self.measured["backbone"].get("weights"):  # a hub model downloaded since (configure_model)
            self.measured["backbone"] = _backbone_fingerprint(self._module)
        return dict(self.measured)


def _backbone_fingerprint(module: L.LightningModule | None) -> dict[str, Any]:
    source = getattr(module, "backbone_source", None)
    return backbone_fingerprint(source.model_name_or_path, source.gguf_file) if source is not None else {}


#: How a resume's refusal names each part that changed (the keys are ``--accept_change`` values).
_CHANGED = {"train_data": ("was trained on other data", "the data"),
            "val_data": ("was validated on other data", "the data"),
            "backbone": ("was trained on another backbone", "the backbone")}


def check_fingerprints(path: str | os.PathLike, checkpoint: Mapping[str, Any], current: Mapping[str, Any],
                       accept: Iterable[str] = ()) -> list[tuple[str, str]]:
    """Refuse (one-line ``ValueError``) to resume ``checkpoint`` into a run whose training data,
    validation data or backbone differ from those it recorded (:class:`RunFingerprint`), naming
    what changed and how, unless ``accept`` (``--accept_change``) names that part; returns the
    accepted ``(part, change)`` pairs. A checkpoint from before fingerprints resumes as before."""
    saved = (checkpoint.get("callbacks") or {}).get(_FINGERPRINT_KEY)
    changes, accept = fingerprint_changes(saved, current) if saved else [], set(accept)
    refused = [(part, what) for part, what in changes if part not in accept]
    if refused:
        part, what = refused[0]
        verb, it = _CHANGED[part]
        raise ValueError(f"checkpoint {path} {verb}: {what}; resume with {it} it was trained on, or pass "
                         f"--accept_change {part} to train on with this one")
    return changes


def refuse_code_settings(path: str | os.PathLike | None, settings: Mapping[str, Any], typed: Mapping[str, Any],
                         trust_option: str = "--model.trust_remote_code true",
                         source_option: str = "--model.model_name_or_path") -> None:
    """A checkpoint is data: refuse (one-line ``ValueError``) ``settings`` taken from checkpoint
    ``path`` that would run or import code which the user's own command line or config
    (``typed``) did not ask for: ``trust_remote_code`` (a model folder's Python) and a
    ``package:MODULE`` source (an import). The options say how the user would set them."""
    from ..sources import PACKAGE_PREFIX

    if settings.get("trust_remote_code") and not typed.get("trust_remote_code"):
        raise ValueError(f"checkpoint {path} sets trust_remote_code: true, which only your command line or config "
                         f"may set (a checkpoint is data); pass {trust_option} if you trust the code "
                         f"of {settings.get('model_name_or_path')!r}")
    source = settings.get("model_name_or_path")
    if isinstance(source, str) and source.startswith(PACKAGE_PREFIX) and typed.get("model_name_or_path") != source:
        raise ValueError(f"checkpoint {path} names the backbone {source!r}, which imports the Python package "
                         f"{source[len(PACKAGE_PREFIX):]!r}; only your command line or config may (a checkpoint is "
                         f"data): pass {source_option} {source} if you mean it")


# ----------------------------------------------------------------------------- reading
def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint the safe way (``weights_only=True``: tensors and plain types only) and
    check that it is a melora-lit training checkpoint with finite values; a one-line
    ``ValueError`` naming the file and the problem otherwise.

    ``path`` may be the folder of a sharded checkpoint (FSDP ``state_dict_type: sharded``,
    FSDP2 ``save_distributed_checkpoint: true``): its ``meta.pt`` (everything but the sharded
    tensors) is read and returned, without ``state_dict``.
    """
    file = Path(path)
    if not file.exists():
        raise ValueError(f"checkpoint not found: {path}")
    if file.is_dir():
        if not (file / SHARDED_METADATA).is_file() or not (file / ".metadata").is_file():
            raise ValueError(f"checkpoint {path} is a folder but not a sharded checkpoint (no {SHARDED_METADATA} "
                             f"and .metadata in it)")
        return _check_contents(path, _load(path, file / SHARDED_METADATA), sharded=True)
    if not file.is_file():
        raise ValueError(f"checkpoint {path} is not a file")
    try:
        empty = file.stat().st_size == 0
    except OSError as err:
        raise ValueError(f"checkpoint {path} cannot be read: {err.strerror}") from None
    if empty:
        raise ValueError(f"checkpoint {path} is empty (an interrupted copy?)")
    return _check_contents(path, _load(path, file), sharded=False)



def _load(path: str | os.PathLike, file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for the same "cannot use this file"
        text = str(err)
        if "Weights only load failed" in text or "weights_only" in text:
            # a pickled object that is not a tensor or plain value: loading it would run code
            found = re.search(r"Unsupported (?:global|operand)[: ]+(?:GLOBAL )?([\w.]+)", text)
            detail = f": it pickles {found.group(1)}" if found else ""
            raise ValueError(f"checkpoint {path} holds pickled objects other than tensors and plain values and is "
                             f"refused (it is loaded with weights_only=True){detail}") from None
        try:
            with open(file, "rb") as f:
                head = f.read(4)
        except OSError as os_err:
            raise ValueError(f"checkpoint {path} cannot be read: {os_err.strerror}") from None
        # torch.save writes a zip archive; torch's own errors for a cut one are cryptic
        if head == b"PK\x03\x04":
            raise ValueError(f"checkpoint {path} is truncated or damaged (an interrupted copy?): "
                             f"torch.load cannot read it") from None
        raise ValueError(f"checkpoint {path} is not a PyTorch checkpoint (not a torch.save zip archive)") from None


def _check_contents(path: str | os.PathLike, ckpt: Any, sharded: bool) -> dict[str, Any]:
    if not isinstance(ckpt, dict) or ("state_dict" not in ckpt and not sharded):
        raise ValueError(f"checkpoint {path} is not a Lightning checkpoint (no state_dict)")
    if "melora" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a melora-lit checkpoint (no 'melora' entry)")
    bad = _nonfinite_key(ckpt.get("state_dict") or {})
    if bad is not None:
        raise ValueError(f"checkpoint {path} holds non-finite values in {bad}")
    return ckpt


def _nonfinite_key(state: Mapping[str, Any]) -> str | None:
    return next((k for k, v in state.items()
                 if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())), None)


def load_module(module_class: type[L.LightningModule], path: str | os.PathLike,
                **overrides: Any) -> L.LightningModule:
    """The ``LightningModule`` of a checkpoint (Lightning's ``load_from_checkpoint``: the module
    rebuilt from the checkpoint's hyper-parameters with ``overrides`` applied, ``configure_model``,
    ``on_load_checkpoint``), in eval mode on CPU, after :func:`read_checkpoint`'s checks."""
    read_checkpoint(path)
    with warnings.catch_warnings():
        # the frozen backbone is not in an adapter checkpoint: its keys are all "missing"
        warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in the checkpoint")
        module = module_class.load_from_checkpoint(path, map_location="cpu", weights_only=True, **overrides)
    return module.eval()


# ----------------------------------------------------------------------------- writing
class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint once, where it belongs: to a temporary file in the checkpoint
    folder, flushed to disk, then renamed over the old one (``os.replace``), so a kill or a full
    disk mid-write leaves the previous checkpoint whole. (Lightning's own write goes through
    ``$TMPDIR`` and is then moved: a second copy, and not atomic across filesystems.) A
    checkpoint with a non-finite weight is refused, so the last one stays the last good one.
    Remote paths (``s3://`` ...) keep Lightning's write."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        bad = _nonfinite_key(checkpoint.get("state_dict") or {})
        if bad is not None:
            raise ValueError(f"refusing to write checkpoint {path} at step {checkpoint.get('global_step')}: "
                             f"parameter {bad} is not finite")
        if "://" in str(path) and not str(path).startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        with staged(Path(str(path).removeprefix("file://")), "wb") as f:  # melora_lit.run: one write, renamed
            torch.save(checkpoint, f)


def use_atomic_checkpoint_io(trainer: L.Trainer) -> None:
    """Put :class:`AtomicCheckpointIO` in place of Lightning's default ``TorchCheckpointIO``
    (a ``CheckpointIO`` of the user's own, given as a trainer plugin, is kept)."""
    if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
        trainer.strategy.checkpoint_io = AtomicCheckpointIO()


# ----------------------------------------------------------------------------- the callback
class ResumableCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` (same arguments) made safe to resume from.

    * ``every_n_train_steps: N`` (with ``save_last``, the CLI's default) rewrites ``last.ckpt``
      every N optimizer steps and at the end of each epoch.
    * On SIGTERM or SIGUSR1 it saves ``last`` after the current step and the run stops with
      :data:`EXIT_PREEMPTED`; more signals during the save or the shutdown change nothing.
    * On start it removes what this run left in its checkpoint folder when it was killed: temp
      files of an unfinished write, and ``epoch=...`` checkpoints beyond ``save_top_k``.
    """

    _told = False  # the preemption message is printed once
    _saved_step: int | None = None  # global step of the last checkpoint written
    _stop_at_epoch_end = False  # a signal came at an epoch's last batch
    _started = False  # the first step may run: a stop from now on saves

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # as given (ModelCheckpoint keeps it in a private attribute); 0: not step-based
        given = inspect.signature(ModelCheckpoint).bind(*args, **kwargs).arguments
        self.step_interval = int(given.get("every_n_train_steps") or 0)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and "://" not in str(self.dirpath) and Path(self.dirpath).is_dir():
            remove_stale_temp_files(Path(self.dirpath))

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._saved_step = trainer.global_step  # any checkpoint of this step, last included

    # -- every N steps and per epoch
    def _save_epoch_end(self, trainer: L.Trainer) -> None:
        skip = (trainer.fast_dev_run or trainer.state.fn != TrainerFn.FITTING or trainer.sanity_checking
                or self._saved_step == trainer.global_step)
        if skip:
            return
        if self.step_interval:
            lightning_private.save_topk_and_last(self, trainer)
        elif self.save_last:
            # Lightning (2.6) rewrites ``last`` only when the top-k checkpoint was saved at this
            # step: without an improvement of the monitor, ``last`` would stay at an older step and
            # ``--ckpt_path last`` would resume from there
            lightning_private.save_last(self, trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if lightning_private.saves_on_train_epoch_end(self, trainer):
            self._save_epoch_end(trainer)
        if self._stop_at_epoch_end:  # a stop requested at the epoch's last batch
            self._save_preempted(trainer)
            raise SIGTERMException

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not lightning_private.saves_on_train_epoch_end(self, trainer):
            self._save_epoch_end(trainer)

    # -- what a killed run left
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero and trainer.ckpt_path:
            self._remove_checkpoints_beyond_top_k()
        self._stop_at_epoch_end = False
        self._told = False
        # a signal during start-up (imports, model and data loading) stops the run here, before
        # its first step; from now on a signal stops it after a step, with a save (melora_lit.run)
        self._started = False
        preemption.stop_before_start("fit", trainer)
        self._started = True
        # SIGTERM stays Lightning's (trainer.received_sigterm) on one process
        preemption.watch(term=trainer.world_size > 1)

    def _remove_checkpoints_beyond_top_k(self) -> None:
        """A kill between writing a new top-k checkpoint and removing the one it replaced leaves
        one too many: on resume, remove ``epoch=...`` files the restored state does not list."""
        if self.save_top_k < 0 or self.filename is not None or not self.dirpath or "://" in str(self.dirpath):
            return
        keep = {Path(p).name for p in (*self.best_k_models, self.best_model_path, self.last_model_path) if p}
        for path in Path(self.dirpath).glob("epoch=*-step=*.ckpt"):
            if path.name not in keep and re.fullmatch(r"epoch=\d+-step=\d+(-v\d+)?\.ckpt", path.name):
                path.unlink(missing_ok=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            preemption.unwatch()
        super().teardown(trainer, pl_module, stage)

    # -- preemption
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # Lightning (2.6) resumes a checkpoint written here at an epoch's last batch wrongly: the
        # next epoch runs without being counted (nor its on_train_epoch_start), and a checkpoint
        # written during that epoch resumes as a finished epoch, so that the epoch is trained
        # again. The last batch's save is left to the epoch end (after validation), where
        # ModelCheckpoint saves by default; so is a stop requested at that batch, as Lightning
        # does with SIGTERM.
        last_batch = trainer.is_last_batch
        if not last_batch:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # every rank must agree, or the save's collectives would hang
        stop = trainer.strategy.reduce_boolean_decision(preemption.requested(trainer) is not None, all=False)
        if stop and not last_batch:
            self._save_preempted(trainer)
            raise SIGTERMException  # what Lightning raises after this hook on SIGTERM; the CLI exits 3
        self._stop_at_epoch_end = self._stop_at_epoch_end or stop

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        # a signal during validation or at an epoch end stops the run outside on_train_batch_end
        # (only fit saves: validate/test/predict stop with nothing written, StopOnSignal)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if isinstance(exception, SIGTERMException) and fitting and self._started and not trainer.sanity_checking:
            self._save_preempted(trainer)

    def _save_preempted(self, trainer: L.Trainer) -> None:
        preemption.stopping()
        name = preemption.requested(trainer) or "SIGTERM"
        if self._saved_step != trainer.global_step and self.save_last:
            lightning_private.save_last(self, trainer)
        if trainer.is_global_zero and not self._told:
            self._told = True
            print(f"melora-lit: received {name}: stopped after step {trainer.global_step}, last checkpoint "
                  f"{self.last_model_path or '(none)'}; rerun with --ckpt_path last to resume "
                  f"(exit status {EXIT_PREEMPTED})", file=sys.stderr, flush=True)
