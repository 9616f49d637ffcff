"""Multi-process training of a MELoRA model: DDP, FSDP (FSDP1) and FSDP2.

Only the adapter and the head train; the backbone is frozen. Every strategy here writes the same
checkpoint: one file, written by rank 0, holding the trainable tensors gathered to full tensors
and the optimizer state keyed the way a plain ``torch.optim`` optimizer keys it (by position in
its parameter groups). So a checkpoint of any strategy loads in any other, a single process
included, and resumes with its optimizer state.

* **DDP**: Lightning's ``DDPStrategy`` as it is (``configs/strategy/ddp.yaml``): gloo on CPU,
  nccl on GPU. Every rank holds the whole model, rank 0 writes the checkpoint.
* **FSDP2**: :class:`FSDP2Strategy`, Lightning's ``ModelParallelStrategy`` for pure data
  parallelism (``configs/strategy/fsdp2.yaml``). ``MELoRAModule.configure_model`` calls
  :func:`apply_fsdp2`: ``fully_shard`` on every transformer layer, then on the root. Runs on
  CPU (gloo) as on GPU (nccl).
* **FSDP** (FSDP1): :class:`FSDPStrategy`, Lightning's ``FSDPStrategy`` with the auto-wrap (and
  optionally activation-checkpointing) policy computed from the backbone's transformer layer
  classes (``configs/strategy/fsdp.yaml``); ``use_orig_params=True``, so that frozen and
  trainable parameters can share a flat parameter. GPU only.

The transformer layer classes come from the backbone's ``_no_split_modules`` (the classes
transformers never splits across devices): :func:`transformer_layer_classes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import FSDPStrategy as _LightningFSDPStrategy
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from . import lightning_private
from .sharded_state import gather_trainable_state, optimizer_state_to_names, optimizer_state_to_positions

__all__ = [
    "FSDP2Strategy",
    "FSDPStrategy",
    "apply_fsdp2",
    "enable_gradient_checkpointing",
    "transformer_layer_classes",
    "with_collective_timeout",
    "COLLECTIVE_TIMEOUT_S",
]


# ------------------------------------------------------------------------------ layer classes
def _backbone(module: nn.Module) -> nn.Module:
    """The outermost submodule (the module itself included) that names ``_no_split_modules``."""
    for m in module.modules():
        if getattr(m, "_no_split_modules", None):
            return m
    raise ValueError(
        f"{type(module).__name__} has no transformers model that declares _no_split_modules; "
        "FSDP cannot tell its transformer layers"
    )


def transformer_layer_classes(module: nn.Module) -> set[type[nn.Module]]:
    """The classes of the backbone's transformer layers: the FSDP units.

    transformers lists in ``_no_split_modules`` the classes that must never be split across
    devices (for BERT ``BertLayer`` and ``BertEmbeddings``). Of those, the ones whose instances
    sit in an ``nn.ModuleList`` are the repeated layers; if none does, all listed classes count.
    ``module`` may be the transformers model or any module that contains it (the
    ``LightningModule``).
    """
    model = _backbone(module)
    names = set(model._no_split_modules)
    present = {type(m) for m in model.modules() if type(m).__name__ in names}
    repeated = {
        type(child)
        for m in model.modules() if isinstance(m, nn.ModuleList)
        for child in m if type(child).__name__ in names
    }
    classes = repeated or present
    if not classes:
        raise ValueError(
            f"{type(model).__name__}._no_split_modules = {sorted(names)} names no module of the model"
        )
    return classes


# ------------------------------------------------------------------------------ FSDP2
def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6
    except ImportError:  # torch 2.4, 2.5
        from torch.distributed._composable.fsdp import fully_shard
    return fully_shard


def apply_fsdp2(model: nn.Module, mesh: Any, reshard_after_forward: bool = True) -> int:
    """Shard ``model`` with FSDP2 over ``mesh``: ``fully_shard`` on each transformer layer, then
    on the root. Returns the number of layers sharded.

    ``mesh``: a 1-D device mesh, or the 2-D mesh of Lightning's ``ModelParallelStrategy``
    (``data_parallel`` x ``tensor_parallel``), whose ``data_parallel`` dimension is used; its
    ``tensor_parallel`` dimension must have size 1.

    Parameters become DTensors sharded on their first dimension, frozen and trainable alike;
    ``requires_grad`` is kept per parameter, so the frozen base weight and the trainable
    ``lora_A``/``lora_B`` of one layer live in the same unit. Mixed precision stays with
    Lightning's precision plugin (autocast), so no ``MixedPrecisionPolicy`` is set here.
    """
    fully_shard = _fully_shard()
    dims = mesh.mesh_dim_names or ()
    if "tensor_parallel" in dims and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"tensor_parallel_size={mesh['tensor_parallel'].size()} is not supported: MELoRA shards with "
            "FSDP2 only; use melora_lit.training.strategies.FSDP2Strategy (data parallel over all processes)"
        )
    if "data_parallel" in dims:
        mesh = mesh["data_parallel"]
    classes = tuple(transformer_layer_classes(model))
    layers = [m for m in model.modules() if isinstance(m, classes)]
    for layer in layers:
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    rank_zero_info(f"melora-lit: FSDP2 sharded {len(layers)} {'/'.join(sorted(c.__name__ for c in classes))} "
                   f"layers, then the root, over {mesh.size()} processes")
    return len(layers)


# ------------------------------------------------------------------------------ checkpointing
def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Non-reentrant activation checkpointing of a transformers model's layers.

    Non-reentrant checkpointing back-propagates into the adapters of a checkpointed layer even
    when the layer's input does not require grad (the output of the frozen embeddings), so it
    needs no ``enable_input_require_grads`` (transformers >= 5 adds that hook anyway).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name warns)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _plain(optimizer: Any) -> torch.optim.Optimizer:
    return optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer  # public property


class _AdapterCheckpointMixin:
    """Single-file adapter checkpoints for the sharded strategies.

    Saving: the state gathered to full tensors on rank 0 (the ``LightningModule``'s
    ``on_save_checkpoint`` keeps the adapter and head keys), the optimizer state gathered and
    keyed by position. Loading a file: every rank reads it (it is small), the optimizer state is
    sharded back here, the model state stays in the checkpoint for the ``LightningModule``'s
    ``on_load_checkpoint``, which validates it and shards it back (:func:`.sharded_state.load_full_state`).
    """

    def _full_checkpoint(self) -> bool:
        raise NotImplementedError

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        if not self._full_checkpoint():
            return super().optimizer_state(optimizer)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        optimizer = _plain(optimizer)
        state = get_optimizer_state_dict(
            self.model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        if self.global_rank != 0:
            return {}
        return optimizer_state_to_positions(state, self.model, optimizer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        path = Path(self.broadcast(checkpoint_path))
        if not path.is_file():  # a sharded checkpoint folder: Lightning's own format
            return super().load_checkpoint(path, weights_only=weights_only)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from .checkpoints import read_checkpoint

        checkpoint = read_checkpoint(path)  # the checks every reader applies
        optimizer_states = checkpoint.get("optimizer_states")
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if fitting and optimizer_states is not None and self.optimizers:
            if len(optimizer_states) != len(self.optimizers):
                raise ValueError(f"checkpoint has {len(optimizer_states)} optimizer states, "
                                 f"the model configures {len(self.optimizers)} optimizers")
            for optimizer, state in zip(self.optimizers, optimizer_states):
                optimizer = _plain(optimizer)
                if state["state"] and not all(isinstance(k, int) for k in state["state"]):
                    raise ValueError("checkpoint optimizer state is not keyed by parameter position")
                named = optimizer_state_to_names(state, self.model, optimizer)
                set_optimizer_state_dict(self.model, optimizer, optim_state_dict=named,
                                         options=StateDictOptions(full_state_dict=True))
        return checkpoint

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # the LightningModule's on_load_checkpoint loaded it (see sharded_state.load_full_state)


# ------------------------------------------------------------------------------ strategies
class FSDP2Strategy(_AdapterCheckpointMixin, ModelParallelStrategy):
    """FSDP2 data parallelism through Lightning's ``ModelParallelStrategy``.

    ``MELoRAModule.configure_model`` shards the model with :func:`apply_fsdp2` over the
    ``data_parallel`` dimension of the device mesh. Runs on CPU (gloo) and GPU (nccl).

    Args:
        data_parallel_size: processes that shard the model; ``"auto"`` = all of them (the world
            size divided by ``tensor_parallel_size``). Lightning's own ``"auto"`` is the number
            of nodes, which would feed every process of a node the same data.
        tensor_parallel_size: must stay 1: MELoRA layers are not tensor-parallel.
        save_distributed_checkpoint: ``False`` (default): one checkpoint file written by rank 0
            with the adapter gathered to full tensors, loadable by any strategy. ``True``:
            Lightning's sharded checkpoint folder (one file per rank), loadable by this strategy
            only.
        process_group_backend: default gloo on CPU, nccl on GPU.
        timeout: of collective operations.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: int = 1,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        if tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size={tensor_parallel_size} is not supported: MELoRA "
                             "shards with FSDP2 only; use tensor_parallel_size: 1")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.save_distributed_checkpoint = save_distributed_checkpoint  # Lightning keeps it private

    def setup_environment(self) -> None:
        lightning_private.resolve_data_parallel_size(self)
        super().setup_environment()

    def _full_checkpoint(self) -> bool:
        return not self.save_distributed_checkpoint

    def lightning_module_state_dict(self) -> dict[str, Any]:
        if not self._full_checkpoint():
            return super().lightning_module_state_dict()
        return gather_trainable_state(self.model)  # Lightning's gathers the frozen backbone too


class FSDPStrategy(_AdapterCheckpointMixin, lightning_private.BeforeFSDPWrap, _LightningFSDPStrategy):
    """FSDP1 (``FullyShardedDataParallel``) for a MELoRA backbone; GPU only.

    Each transformer layer (:func:`transformer_layer_classes`, found when the model is set up,
    so no class names in the config) becomes an FSDP unit; ``use_orig_params=True`` lets the
    frozen base weights and the trainable adapter of a layer share its flat parameter.

    Args:
        auto_wrap: wrap each transformer layer in its own unit (else the whole model is one unit).
        activation_checkpointing: recompute each transformer layer's activations in backward
            (non-reentrant ``checkpoint_wrapper``). ``MELoRAModule(gradient_checkpointing=True)``
            is the transformers-side alternative; use one of the two.
        sharding_strategy: ``FULL_SHARD``, ``SHARD_GRAD_OP``, ``NO_SHARD`` or ``HYBRID_SHARD``.
        state_dict_type: ``full`` (default): one adapter checkpoint file written by rank 0,
            loadable by any strategy. ``sharded``: Lightning's checkpoint folder, FSDP only.
        cpu_offload: keep parameters and gradients on CPU between uses.
        process_group_backend: default nccl.
        timeout: of collective operations.
        **kwargs: more ``FullyShardedDataParallel`` arguments (e.g. ``limit_all_gathers``).
    """

    def __init__(
        self,
        auto_wrap: bool = True,
        activation_checkpointing: bool = False,
        sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD",
        state_dict_type: Literal["full", "sharded"] = "full",
        cpu_offload: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("use_orig_params", True)
        super().__init__(sharding_strategy=sharding_strategy, state_dict_type=state_dict_type,
                         cpu_offload=cpu_offload, process_group_backend=process_group_backend,
                         timeout=timeout, **kwargs)
        self.auto_wrap = auto_wrap
        self.activation_checkpointing = activation_checkpointing
        self.state_dict_type = state_dict_type  # Lightning keeps it private

    def setup_environment(self) -> None:
        # Lightning refuses FSDP on CPU only for its own class; torch's FSDP1 needs an accelerator.
        if self.root_device.type == "cpu":
            raise ValueError("FSDPStrategy (FSDP1) needs GPUs; on CPU use FSDP2: configs/strategy/fsdp2.yaml")
        super().setup_environment()

    def set_layer_policies(self, model: nn.Module) -> None:
        """Set the auto-wrap and activation-checkpointing policies from the model's transformer
        layer classes (unless given as ``auto_wrap_policy`` / ``activation_checkpointing_policy``)."""
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if not (self.auto_wrap or self.activation_checkpointing):
            return
        classes = transformer_layer_classes(model)
        if self.auto_wrap:
            self.kwargs.setdefault("auto_wrap_policy", ModuleWrapPolicy(classes))
        if self.activation_checkpointing:
            lightning_private.fsdp_set_activation_checkpointing(self, {"auto_wrap_policy": ModuleWrapPolicy(classes)})
        rank_zero_info(f"melora-lit: FSDP units: each {'/'.join(sorted(c.__name__ for c in classes))}"
                       f"{' (activations checkpointed)' if self.activation_checkpointing else ''}, then the root")

    def before_fsdp_wrap(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if not any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            self.set_layer_policies(model)

    def _full_checkpoint(self) -> bool:
        return self.state_dict_type == "full"


# ------------------------------------------------------------------------------ collective timeout
#: ``--collective_timeout``'s default, in seconds: a lost node ends the run in minutes, not torch's
#: 30; long enough for rank 0's checkpoint write and a slow first data load that the others wait for.
COLLECTIVE_TIMEOUT_S = 600.0


def with_collective_timeout(trainer: Any, seconds: float | None) -> list[tuple[Any, str, Any]]:
    """Give the parsed trainer config's strategy (a ``class_path`` or a registered name such as
    ``ddp``) ``timeout=seconds`` (``--collective_timeout``: how long a collective, process-group
    set-up included, waits for the other processes), where it takes one and it is left at torch's
    default (30 min). Returns ``(namespace, key, value)`` to put back after instantiation, so that
    ``config.yaml`` keeps ``collective_timeout`` alone. ``auto``: the strategy Lightning picks
    keeps its own default."""
    import inspect

    from jsonargparse import Namespace
    from lightning.pytorch.strategies import StrategyRegistry

    strategy = trainer.get("strategy") if trainer is not None else None
    if seconds is None or strategy is None:
        return []
    timeout = timedelta(seconds=seconds)
    if isinstance(strategy, str):
        entry = dict.get(StrategyRegistry, strategy)  # its class and arguments (.get builds one)
        if entry is None or "timeout" not in inspect.signature(entry["strategy"]).parameters:
            return []
        cls = entry["strategy"]
        trainer.strategy = Namespace(class_path=f"{cls.__module__}.{cls.__qualname__}",
                                     init_args=Namespace(**{**entry["init_params"], "timeout": timeout}))
        return [(trainer, "strategy", strategy)]
    args = strategy.get("init_args") if isinstance(strategy, Namespace) else None
    if args is None or args.get("timeout", default_pg_timeout) not in (None, default_pg_timeout):
        return []  # not a class_path, or its own timeout set
    from importlib import import_module

    module, _, name = str(strategy.class_path).rpartition(".")
    if "timeout" not in inspect.signature(getattr(import_module(module), name)).parameters:
        return []
    before = args.get("timeout")
    args.timeout = timeout
    return [(args, "timeout", before)]
