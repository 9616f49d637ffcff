"""What differs between the tasks that :class:`~melora_lit.training.module.MELoRAModule` trains:
how the backbone is loaded, which heads are trained with the adapter, which metrics are kept,
what an evaluation step logs and what ``predict`` returns, and what the commands that only have a
checkpoint's hyper-parameters ask of its task (export, evaluate, generate). One :class:`Task` per
``task:`` value: :class:`~melora_lit.training.classification.SequenceClassification` and
:class:`~melora_lit.training.causal_lm.CausalLM`, registered by their ``name`` as they are defined
(the ``training`` package imports both); :func:`task_class` finds one. No module outside the task
classes compares task names: they ask the task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch
from torch import nn
from torchmetrics import MetricCollection

from ..errors import first_line, offline_hint
from ..sources import resolve_pretrained

if TYPE_CHECKING:
    import lightning as L

    from ..data.base import MELoRADataModule

__all__ = ["ATTN_IMPLEMENTATIONS", "BACKBONE_DTYPES", "DEFAULT_TASK", "BackboneSource", "StepLoss", "Task",
           "task_class", "task_names", "load_backbone"]

#: the ``task:`` of a module (and of a checkpoint that records none)
DEFAULT_TASK = "sequence-classification"
BACKBONE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: attention backends of transformers that ``attn_implementation`` may name (docs: README, "Attention")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass(frozen=True)
class BackboneSource:
    """Where the frozen backbone comes from: a hub name, local path, ``package:MODULE`` or GGUF
    file (see :mod:`melora_lit.sources`), and how to load it."""

    model_name_or_path: str
    trust_remote_code: bool = False
    gguf_file: str | None = None
    dtype: str | None = None  # a key of BACKBONE_DTYPES; None: as the checkpoint loads
    attn_implementation: str | None = None  # one of ATTN_IMPLEMENTATIONS; None: transformers' choice

    @property
    def path(self) -> str:
        return resolve_pretrained(self.model_name_or_path, self.gguf_file)

    def from_pretrained(self, auto_class: Any, **kwargs: Any) -> nn.Module:
        """``auto_class.from_pretrained`` of this source, with a one-line error when it can't."""
        path = self.path
        if self.dtype is not None:
            kwargs["dtype"] = BACKBONE_DTYPES[self.dtype]
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        try:
            return auto_class.from_pretrained(path, trust_remote_code=self.trust_remote_code, **kwargs)
        except OSError as err:
            raise ValueError(f"cannot load model {path!r}{offline_hint(err)}: {first_line(err)}") from None


class StepLoss:
    """The logged ``train/loss`` of an optimizer step: the summed loss of its micro-batches on
    every process over their count (samples, or target tokens); the epoch's ``train/loss`` is
    weighted by the same counts."""

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []  # (loss sum, count) per micro-batch

    def add(self, loss_sum: torch.Tensor, count: torch.Tensor | int) -> None:
        count = torch.as_tensor(count, dtype=torch.float64, device=loss_sum.device)
        self.sums.append(torch.stack([loss_sum.detach().double(), count]))

    def log(self, module: L.LightningModule) -> torch.Tensor | None:
        """Log the step's loss; the step's count over all processes (None: no micro-batch)."""
        if not self.sums:
            return None
        loss_sum, count = module.trainer.strategy.reduce(torch.stack(self.sums).sum(0), reduce_op="sum")
        self.sums = []
        count = count.clamp(min=1.0)
        module.log("train/loss", loss_sum / count, on_step=True, on_epoch=True, prog_bar=True, batch_size=int(count))
        return count


_REGISTRY: dict[str, type[Task]] = {}


class Task(ABC):
    """The task-specific part of a MELoRA run. The class attributes describe the task for code
    that has only a ``task:`` name (:func:`task_class`), such as a checkpoint's hyper-parameters."""

    name: ClassVar[str]
    #: the checkpoint monitor and mode of a run that sets none (the quickstart config's)
    default_monitor: ClassVar[tuple[str, str]] = ("val/loss", "min")
    #: whether a data module's ``build_metrics()`` decides the metrics (else the task alone)
    metrics_from_data: ClassVar[bool] = False
    #: keyword arguments of every forward of the backbone, unless the batch sets them
    forward_defaults: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    #: ``predict``'s default file, in the run's folder (``.csv`` or ``.jsonl``)
    prediction_file: ClassVar[str] = "predictions.csv"
    #: whether it generates text: ``generate()``, ``melora-lit generate``, generation evaluation
    generates: ClassVar[bool] = False
    #: whether ``melora-lit evaluate`` (lm-evaluation-harness) can score it
    lm_eval: ClassVar[bool] = False
    #: model settings it does not read (a resume does not compare them)
    unused_settings: ClassVar[tuple[str, ...]] = ()
    #: the transformers auto class of an exported merged model, and the model card's pipeline tag
    auto_model_class: ClassVar[str]
    pipeline_tag: ClassVar[str]
    #: class names in id order (classification; restored from a checkpoint when not given)
    label_names: list[str] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:  # a concrete task: known by its name from now on
            _REGISTRY[cls.name] = cls

    @classmethod
    @abstractmethod
    def create(cls, num_labels: int | None = None, label_names: list[str] | None = None,
               generation: Any = None) -> Task:
        """The task from the module's settings (each task takes the ones it reads); one-line
        ValueErrors for bad ones."""

    def load_backbone(self, source: BackboneSource) -> nn.Module:
        """The pretrained model with this task's head (:attr:`auto_model_class`)."""
        import transformers

        return source.from_pretrained(getattr(transformers, self.auto_model_class), **self.backbone_config())

    def backbone_config(self) -> dict[str, Any]:
        """What ``from_pretrained`` sets in the backbone's config for this task."""
        return {}

    def heads(self, model: nn.Module) -> list[str]:
        """Modules the backbone builds fresh for this task (trained and saved with the adapter
        unless the MELoRA config names its own ``modules_to_save``)."""
        return []

    def __init__(self) -> None:
        self.step_loss = StepLoss()

    def training_step(self, module: L.LightningModule, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of one (micro-)batch, which Lightning runs backward on: the backbone's own mean
        over the batch."""
        loss = module(**batch).loss
        self.step_loss.add(loss.detach() * len(batch["input_ids"]), len(batch["input_ids"]))
        return loss

    def finish_gradients(self, module: L.LightningModule) -> None:
        """Called once per optimizer step, after its last backward (and the gradient all-reduce),
        before any ``on_before_optimizer_step`` hook, clipping or the step itself: logs the step's
        ``train/loss``, weighted by samples."""
        self.step_loss.log(module)

    def check_data(self, data: MELoRADataModule) -> None:
        """A one-line ValueError unless ``data`` is this task's (its ``model_task``)."""
        if data.model_task != self.name:
            raise ValueError(f"{type(data).__name__} is {data.model_task} data; it does not fit --model.task "
                             f"{self.name} (pass --model.task {data.model_task}, or other data)")

    @abstractmethod
    def build_metrics(self, data: MELoRADataModule | None) -> MetricCollection:
        """The metric collection of one evaluation set (keys without prefix)."""

    @abstractmethod
    def eval_step(self, module: L.LightningModule, batch: dict[str, torch.Tensor], metrics: MetricCollection,
                  prefix: str) -> None:
        """Update ``metrics`` with one batch and log them under ``prefix``."""

    @abstractmethod
    def predict_step(self, module: L.LightningModule, batch: dict[str, torch.Tensor]) -> dict[str, list]:
        """One batch of ``predict`` results, a list per output column."""


def task_names() -> tuple[str, ...]:
    """The ``task:`` values, in the order the tasks were defined."""
    return tuple(_REGISTRY)


def task_class(name: str | None) -> type[Task]:
    """The :class:`Task` of a ``task:`` value (None: :data:`DEFAULT_TASK`); a one-line ValueError
    for an unknown one."""
    try:
        return _REGISTRY[DEFAULT_TASK if name is None else name]
    except KeyError:
        raise ValueError(f"task={name!r} is not valid; use one of {', '.join(_REGISTRY)}") from None


def load_backbone(
    model_name_or_path: str,
    task: str = "sequence-classification",
    num_labels: int | None = 2,
    label_names: list[str] | None = None,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    dtype: str | None = None,
) -> nn.Module:
    """Load a transformers model by hub name, local path, ``package:MODULE`` or GGUF file (see
    :mod:`melora_lit.sources`), with a clear error when it can't.

    ``task``: ``sequence-classification`` (a fresh head of ``num_labels`` outputs, 1 = regression)
    or ``causal-lm`` (the model with its language modeling head; num_labels and label_names are
    not used).
    """
    source = BackboneSource(model_name_or_path, trust_remote_code, gguf_file, dtype)
    return task_class(task).create(num_labels, label_names).load_backbone(source)
