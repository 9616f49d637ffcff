"""The Lightning side: one LightningModule that puts MELoRA into a frozen transformers backbone.

What differs between tasks (the head, metrics, evaluation and ``predict``) is a
:class:`~melora_lit.training.tasks.Task` (:mod:`~melora_lit.training.classification`,
:mod:`~melora_lit.training.causal_lm`); the optimizer and schedule are in
:mod:`~melora_lit.training.optim`; the data side of the contract is
:class:`~melora_lit.data.base.MELoRADataModule`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from ..adapter import InjectionSummary, MELoRAConfig, inject_melora
from ..adapter.io import load_adapter_weights
from ..adapter.quantize import check_device, check_scheme, keep_out_of_ddp_broadcast, quantize_backbone
from .checkpoints import attached_trainer, load_adapter_state, record_adapter_shapes, save_adapter_state
from .causal_lm import GenerationOptions
from .optim import SCHEDULES, check_optimizer, configure_optimization, parameter_groups
from .precision import keep_trainable_float32
from .tasks import ATTN_IMPLEMENTATIONS, BACKBONE_DTYPES, BackboneSource, load_backbone, task_class

if TYPE_CHECKING:
    from ..data.base import MELoRADataModule

__all__ = ["MELoRAModule", "GenerationOptions", "load_backbone"]


class MELoRAModule(L.LightningModule):
    """Fine-tune a frozen transformers backbone through MELoRA adapters.

    Args:
        model_name_or_path: hub name (e.g. ``roberta-base``), local directory, ``package:MODULE``
            (a model shipped in a Python package) or GGUF file of the backbone (see
            :mod:`melora_lit.sources`).
        task: what the backbone is trained for: ``sequence-classification`` (a classification
            head; one output = regression) or ``causal-lm`` (instruction tuning of a decoder:
            token loss, perplexity, ``predict`` generates responses).
        num_labels: number of classes (1 = regression). Linked from the data module by the CLI;
            not used by ``causal-lm``.
        label_names: class names in id order, saved with each checkpoint and used by
            ``predict``. Linked from the data module by the CLI; not used by ``causal-lm``.
        melora: the adapter: rank, number of mini LoRAs, targets, modules to save.
        learning_rate: peak learning rate of the adapter (set on its parameter groups, whatever
            the optimizer).
        head_learning_rate: learning rate of ``modules_to_save`` (the head); default the same.
        weight_decay: weight decay of the optimizer; never applied to biases and normalization
            weights.
        warmup_ratio: fraction of the training steps with a linear warmup (named schedules).
        warmup_steps: number of warmup steps; overrides ``warmup_ratio`` when set.
        adam_betas: AdamW betas (the default optimizer).
        adam_eps: AdamW epsilon (the default optimizer).
        trust_remote_code: allow the backbone's own code from the hub (off unless set).
        gguf_file: a GGUF file in the ``model_name_or_path`` directory or hub repository (or an
            absolute path): the backbone is dequantized from it once and cached.
        backbone_dtype: dtype of the frozen backbone weights (default: as the checkpoint loads,
            float32 for most); ``bfloat16`` halves the memory of a 7B model. The adapters and
            ``modules_to_save`` stay float32 either way.
        generation: ``predict`` decoding for ``causal-lm`` (greedy by default); not stored in
            checkpoints, so each predict run's config decides.
        gradient_checkpointing: recompute the backbone layers' activations in backward
            (non-reentrant) instead of keeping them: less activation memory, more compute.
        lr_schedule: the learning-rate schedule after the warmup, stepped every optimizer step:
            ``linear`` (decay to zero at the last step), ``cosine`` (half a cosine down to zero)
            or ``constant``.
        optimizer: the optimizer, as ``--optimizer CLASS --optimizer.OPTION VALUE`` (default
            AdamW with ``adam_betas``, ``adam_eps``). It receives parameter groups whose ``lr``
            and ``weight_decay`` are ``learning_rate``/``head_learning_rate`` and
            ``weight_decay`` (setting the optimizer's own ``lr`` or ``weight_decay`` is an error).
        lr_scheduler: any torch scheduler instead of ``lr_schedule``, as ``--lr_scheduler CLASS
            --lr_scheduler.OPTION VALUE``; stepped every optimizer step (``ReduceLROnPlateau``:
            after each validation, on the first validation set's loss).
        compile: ``torch.compile`` the backbone's forward (the MELoRA layers compile into its
            graph); the first steps are slower while it compiles.
        quantization: store the frozen linear layers quantized, QLoRA-style (needs torchao):
            ``nf4`` (4-bit NormalFloat, double-quantized scales) or ``int8`` (weight-only). The
            adapters, head, embeddings and norms stay in full precision; checkpoints stay
            adapter-only. Single device and DDP (docs/quantization.md).
        attn_implementation: the backbone's attention backend, passed to ``from_pretrained``
            (default: transformers' choice, ``sdpa`` where the model supports it): ``sdpa`` (CPU
            and GPU), ``eager`` (CPU and GPU, the reference), ``flash_attention_2`` or
            ``flash_attention_3`` (NVIDIA GPUs, the ``flash-attn`` package, bf16/fp16 backbones),
            ``flex_attention`` (GPUs, torch >= 2.5). Packed rows work with all of them (position
            ids restart per sample). Not part of the run: a resume may change it.
        init_adapter: start ``fit`` from an exported adapter folder (``melora-lit export --format
            adapter`` or ``peft``, or a PEFT LoRA of rank n*r trained elsewhere) instead of the fresh
            initialization: its weights (and saved heads) are copied in before the first step; the
            optimizer and schedule start fresh. Refused in one line where the shapes differ. A resume
            (``--ckpt_path``) continues from its checkpoint and does not read it.
    """

    def __init__(
        self,
        model_name_or_path: str,
        task: Literal["sequence-classification", "causal-lm"] = "sequence-classification",
        num_labels: int | None = 2,
        label_names: list[str] | None = None,
        melora: MELoRAConfig | None = None,
        learning_rate: float = 5e-4,
        head_learning_rate: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.06,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        trust_remote_code: bool = False,
        warmup_steps: int | None = None,
        gguf_file: str | None = None,
        backbone_dtype: Literal["float32", "bfloat16", "float16"] | None = None,
        generation: GenerationOptions | None = None,
        gradient_checkpointing: bool = False,
        lr_schedule: Literal["linear", "cosine", "constant"] = "linear",
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        compile: bool = False,  # noqa: A002 - the option's name, as torch.compile
        quantization: Literal["nf4", "int8"] | None = None,
        attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3",
                                     "flex_attention"] | None = None,
        init_adapter: str | None = None,
    ) -> None:
        super().__init__()
        melora = melora if melora is not None else MELoRAConfig()
        self.task = task_class(task).create(num_labels, label_names, generation)  # validates them
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={warmup_ratio} is not valid; use a fraction in [0, 1)")
        if warmup_steps is not None and (not isinstance(warmup_steps, int) or warmup_steps < 0):
            raise ValueError(f"warmup_steps={warmup_steps!r} is not valid; use an integer >= 0")
        if backbone_dtype is not None and backbone_dtype not in BACKBONE_DTYPES:
            raise ValueError(f"backbone_dtype={backbone_dtype!r} is not valid; use one of {', '.join(BACKBONE_DTYPES)}")
        if lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule={lr_schedule!r} is not valid; use one of {', '.join(SCHEDULES)}")
        check_scheme(quantization)
        if optimizer is not None:
            check_optimizer(optimizer)
        # Plain types only in hparams, so checkpoints load with weights_only=True. Left out:
        # generation, so that a predict run's own settings apply (LightningCLI restores hparams);
        # the optimizer and scheduler callables (the run's config.yaml holds them).
        self.save_hyperparameters(ignore=["melora", "generation", "optimizer", "lr_scheduler"])
        self.hparams["melora"] = melora.to_dict()  # the adapter as requested; as injected: melora_config
        if attn_implementation is not None and attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation={attn_implementation!r} is not valid; use one of "
                             f"{', '.join(ATTN_IMPLEMENTATIONS)}")
        self.backbone_source = BackboneSource(model_name_or_path, trust_remote_code, gguf_file, backbone_dtype,
                                              attn_implementation)
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.data: MELoRADataModule | None = None  # set in setup() when the run has one
        self.model: nn.Module | None = None
        self.summary: InjectionSummary | None = None
        # Checkpoints hold only the trainable state; the frozen backbone comes from its source.
        self.strict_loading = False

    # ----------------------------------------------------------------------------- model
    def configure_model(self) -> None:
        if self.model is not None:  # called again by validate/test after fit
            return
        if self.hparams.get("quantization"):  # before any weights load: a setup it cannot serve fails here
            _check_quantization_setup(self.hparams.quantization, attached_trainer(self))
        # Built on the CPU whatever device Lightning's context names (one GPU's for a single
        # device or DDP, the CPU for FSDP), and moved by the strategy: every random draw (fresh
        # heads, adapters) comes from the CPU generator, so for one seed a run starts from the same
        # weights on the CPU, on one GPU, on several, and under FSDP.
        with torch.device("cpu"):
            model = self.task.load_backbone(self.backbone_source)
            self.summary = self._inject(model)
        self._warm_start(model)
        record_adapter_shapes(self, model)  # before sharding splits or renames the tensors
        self.model = self._parallelize(model)

    def _inject(self, model: nn.Module) -> InjectionSummary:
        """Wrap the targets in MELoRA layers (the task's heads are saved unless the config
        names its own ``modules_to_save``); the trained parts stay float32."""
        # from_pretrained returns eval mode, and Lightning keeps submodule modes as it finds
        # them: without this the backbone's dropout would stay off during training.
        model.train(self.training)
        config = MELoRAConfig(**self.hparams["melora"])
        if not config.modules_to_save:
            config = MELoRAConfig(**{**config.to_dict(), "modules_to_save": self.task.heads(model)})
        summary = inject_melora(model, config)
        if self.hparams.get("quantization"):  # the frozen linear layers, after the adapters took theirs
            trainer = attached_trainer(self)
            if trainer is not None:  # quantized where it runs (one device or DDP), in its memory
                model.to(trainer.strategy.root_device)
            self.quantization_summary = quantize_backbone(model, self.hparams.quantization)
            keep_out_of_ddp_broadcast(self, model, "model.")
        if self.backbone_source.dtype not in (None, "float32"):
            keep_trainable_float32(model, summary.modules_to_save)
        return summary

    def _warm_start(self, model: nn.Module) -> None:
        """``init_adapter``'s weights, for a ``fit`` that starts fresh (not a resume, not the
        other commands, which load a checkpoint)."""
        path, trainer = self.hparams.get("init_adapter"), attached_trainer(self)
        if not path or trainer is None or trainer.state.fn != "fit" or trainer.ckpt_path is not None:
            return
        try:
            kind = load_adapter_weights(model, path, self.summary.modules_to_save)
        except (OSError, ValueError) as err:
            raise ValueError(f"model.init_adapter={path!r}: {err}") from None
        rank_zero_info(f"melora-lit: started from the {kind} adapter in {path} (fresh optimizer)")

    def _parallelize(self, model: nn.Module) -> nn.Module:
        """Gradient checkpointing, FSDP2 sharding under a ModelParallelStrategy (see
        :mod:`melora_lit.training.strategies`), then ``torch.compile``."""
        if self.hparams.get("gradient_checkpointing"):
            from .strategies import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        if self.device_mesh is not None:
            from .strategies import apply_fsdp2

            apply_fsdp2(model, self.device_mesh)
        if self.hparams.get("compile"):
            model.compile()  # in place: the state-dict keys (and so the checkpoints) stay as they are
        return model

    @property
    def melora_config(self) -> MELoRAConfig:
        """The adapter's config: as injected (with the task's heads) once the model is built,
        else as requested."""
        return self.summary.config if self.summary is not None else MELoRAConfig(**self.hparams["melora"])

    @property
    def label_names(self) -> list[str] | None:
        """Class names in id order (``predict``'s labels); None for regression and causal LM."""
        return self.task.label_names

    @label_names.setter
    def label_names(self, names: list[str] | None) -> None:
        self.task.label_names = names

    def on_fit_start(self) -> None:
        # Not in self.hparams: those must stay the init arguments, which LightningCLI reads
        # back from a checkpoint to rebuild the model.
        for logger in self.loggers:
            logger.log_hyperparams(self.run_hparams())

    def run_hparams(self) -> dict[str, Any]:
        """What a run logs besides the init arguments: parameter counts and the MELoRA config
        as injected (head included)."""
        return {
            "trainable_params": self.summary.trainable_params,
            "total_params": self.summary.total_params,
            "adapter_params": self.summary.adapter_params,
            "melora": self.melora_config.to_dict(),
        }

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.model(**{**self.task.forward_defaults, **batch})

    # ----------------------------------------------------------------------------- data and metrics
    def setup(self, stage: str) -> None:
        from ..data.base import MELoRADataModule  # not at the top: datasets costs export and generate 0.5 s

        dm = self.trainer.datamodule
        self.data = dm if isinstance(dm, MELoRADataModule) else None
        if self.data is not None:
            self.task.check_data(self.data)
        val_names = self.data.val_names if self.data is not None else ["val"]
        test_names = self.data.test_names if self.data is not None else ["test"]
        base = self.task.build_metrics(self.data)
        self.val_metrics = nn.ModuleList([base.clone(prefix=f"{n}/") for n in val_names])
        self.test_metrics = nn.ModuleList([base.clone(prefix=f"{n}/") for n in test_names])
        self._eval_names = {"val": val_names, "test": test_names}

    # ----------------------------------------------------------------------------- steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.task.training_step(self, batch)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        # Lightning's own step, with the task's last word on the gradients between the step's last
        # backward (run by the closure) and the optimizer hooks (token weighting: causal_lm.py)
        def closure() -> Any:
            loss = optimizer_closure()
            self.task.finish_gradients(self)
            return loss

        optimizer.step(closure=closure)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.task.eval_step(self, batch, self.val_metrics[dataloader_idx], self._eval_names["val"][dataloader_idx])

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.task.eval_step(self, batch, self.test_metrics[dataloader_idx], self._eval_names["test"][dataloader_idx])

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> dict:
        return self.task.predict_step(self, {k: v for k, v in batch.items() if k != "labels"})

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        """Responses of a causal LM to a batch of left-padded prompts, with ``generation``'s
        settings (what ``predict`` writes)."""
        if not self.task.generates:
            raise ValueError(f"generate() needs --model.task causal-lm, this model is {self.task.name}")
        return self.task.predict_step(self, {"input_ids": input_ids, "attention_mask": attention_mask})["response"]

    # ----------------------------------------------------------------------------- optimization
    def configure_optimizers(self) -> dict:
        hp = self.hparams
        groups = parameter_groups(self.model, self.summary.modules_to_save, hp.learning_rate,
                                  hp.head_learning_rate, hp.weight_decay)
        return configure_optimization(
            groups, self.trainer.estimated_stepping_batches, learning_rate=hp.learning_rate,
            adam_betas=hp.adam_betas, adam_eps=hp.adam_eps, warmup_ratio=hp.warmup_ratio,
            warmup_steps=hp.get("warmup_steps"), lr_schedule=hp.get("lr_schedule", "linear"),
            optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, monitor=f"{self._eval_names['val'][0]}/loss",
        )

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        save_adapter_state(self, checkpoint)  # adapter-only (melora_lit.training.checkpoints)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        load_adapter_state(self, checkpoint)


def _check_quantization_setup(scheme: str, trainer: L.Trainer | None) -> None:
    """One line naming what a quantized backbone cannot run with: the device, or a strategy
    other than a single device or DDP (FSDP would flatten or shard the quantized tensors)."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    if trainer is None:  # export and scripts: the backbone stays on the CPU
        return
    strategy = trainer.strategy
    check_device(scheme, strategy.root_device)
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)):
        raise ValueError(f"quantization={scheme!r} runs on one device or with DDP, not with "
                         f"{type(strategy).__name__}; use configs/strategy/ddp.yaml or drop --model.quantization")
