"""Sequence classification (``task: sequence-classification``): a fresh head of ``num_labels``
outputs on the backbone (one output: a regression score), accuracy/F1 or the data's metrics,
``predict`` gives a label name and its probability (regression: the score)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import lightning as L
import torch
from torch import nn
from torchmetrics import MetricCollection

from ..metrics import classification_metrics, regression_metrics
from ..adapter.inject import fresh_heads
from .tasks import Task

if TYPE_CHECKING:
    from ..data.base import MELoRADataModule

__all__ = ["SequenceClassification"]

class SequenceClassification(Task):
    """A classifier of ``num_labels`` classes (1 = regression) named ``label_names``."""

    name: ClassVar[str] = "sequence-classification"
    default_monitor: ClassVar[tuple[str, str]] = ("val/accuracy", "max")
    metrics_from_data: ClassVar[bool] = True  # the data names its metrics (GLUE: Matthews, Pearson, ...)
    auto_model_class: ClassVar[str] = "AutoModelForSequenceClassification"
    pipeline_tag: ClassVar[str] = "text-classification"

    @classmethod
    def create(cls, num_labels: int | None = None, label_names: list[str] | None = None,
               generation: Any = None) -> SequenceClassification:
        return cls(num_labels, label_names)

    def __init__(self, num_labels: int | None, label_names: list[str] | None = None) -> None:
        super().__init__()
        if num_labels is None or num_labels < 1:
            raise ValueError(f"num_labels={num_labels} is not valid; use 1 (regression) or the number of classes "
                             f"(data without classes, such as instruction data, needs --model.task causal-lm)")
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(f"label_names has {len(label_names)} names but num_labels={num_labels}")
        self.num_labels = num_labels
        self.label_names = list(label_names) if label_names else None

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    def backbone_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"num_labels": self.num_labels}
        if self.is_regression:
            config["problem_type"] = "regression"
        elif self.label_names:
            config["id2label"] = dict(enumerate(self.label_names))
            config["label2id"] = {name: i for i, name in enumerate(self.label_names)}
        return config

    def heads(self, model: nn.Module) -> list[str]:
        # the heads a sequence classifier builds fresh: always trained and saved with the adapter
        return [h for h in fresh_heads("SEQ_CLS") if hasattr(model, h)]

    def build_metrics(self, data: MELoRADataModule | None) -> MetricCollection:
        if data is not None:
            return data.build_metrics()
        return regression_metrics() if self.is_regression else classification_metrics(self.num_labels)

    def eval_step(self, module: L.LightningModule, batch: dict[str, torch.Tensor], metrics: MetricCollection,
                  prefix: str) -> None:
        out = module(**batch)
        logits = out.logits
        metrics.update(logits.squeeze(-1).float() if self.is_regression else logits.argmax(-1), batch["labels"])
        kw = dict(on_epoch=True, add_dataloader_idx=False, batch_size=len(batch["input_ids"]))
        module.log(f"{prefix}/loss", out.loss, sync_dist=True, **kw)  # over all processes' batches
        module.log_dict(metrics, prog_bar=True, **kw)

    def predict_step(self, module: L.LightningModule, batch: dict[str, torch.Tensor]) -> dict[str, list]:
        logits = module(**batch).logits.float()
        if self.is_regression:
            return {"prediction": logits.squeeze(-1).tolist()}
        score, ids = logits.softmax(-1).max(-1)
        names = self.label_names or [str(i) for i in range(self.num_labels)]
        return {"prediction": [names[i] for i in ids.tolist()], "score": score.tolist()}
