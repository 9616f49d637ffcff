"""Evaluation metrics for the GLUE tasks and for a user's own text classification data.

Every collection is updated with ``metrics.update(preds, target)``: ``preds`` are predicted class
ids (int64) for classification and float scores for regression (STS-B). Keys are plain metric
names (``"accuracy"``, ``"f1"``, ``"matthews"``, ``"pearson"``, ``"spearman"``); callers add the
split prefix with ``MetricCollection.clone(prefix=...)``.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
    MulticlassF1Score,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

__all__ = ["GLUE_NUM_LABELS", "glue_metrics", "classification_metrics", "regression_metrics", "TokenMeanLoss",
           "TokenPerplexity", "language_modeling_metrics", "main_metric"]

# Output size per GLUE task; 1 is a regression score (STS-B).
GLUE_NUM_LABELS: dict[str, int] = {
    "cola": 2,
    "sst2": 2,
    "mrpc": 2,
    "qqp": 2,
    "stsb": 1,
    "mnli": 3,
    "qnli": 2,
    "rte": 2,
    "wnli": 2,
}


def glue_metrics(task: str) -> MetricCollection:
    """A fresh metric collection with the official metrics of a GLUE task.

    CoLA: ``matthews``; STS-B: ``pearson`` and ``spearman``; MRPC and QQP: ``accuracy`` and
    ``f1`` (binary F1 of class 1, the paraphrase class); all other tasks: ``accuracy``.

    Args:
        task: GLUE task name, one of ``GLUE_NUM_LABELS``.
    """
    if task not in GLUE_NUM_LABELS:
        raise ValueError(f"unknown GLUE task {task!r}; valid tasks: {', '.join(GLUE_NUM_LABELS)}")
    if task == "cola":
        return MetricCollection({"matthews": BinaryMatthewsCorrCoef()})
    if task == "stsb":
        return regression_metrics()
    if task in ("mrpc", "qqp"):
        return MetricCollection({"accuracy": BinaryAccuracy(), "f1": BinaryF1Score()})
    # average="micro" is plain accuracy; torchmetrics' multiclass default is macro (mean recall).
    return MetricCollection(
        {"accuracy": MulticlassAccuracy(num_classes=GLUE_NUM_LABELS[task], average="micro")}
    )


def classification_metrics(num_labels: int) -> MetricCollection:
    """A fresh ``accuracy`` and macro ``f1`` collection for ``num_labels`` classes.

    Macro F1 weighs every class equally, so a model that ignores a rare class shows it.

    Args:
        num_labels: number of classes, at least 2.
    """
    if not isinstance(num_labels, int) or num_labels < 2:
        raise ValueError(f"num_labels must be an integer >= 2 for classification, got {num_labels!r}")
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(num_classes=num_labels, average="micro"),
            "f1": MulticlassF1Score(num_classes=num_labels, average="macro"),
        }
    )


def regression_metrics() -> MetricCollection:
    """A fresh ``pearson`` and ``spearman`` collection for a regression score (STS-B)."""
    return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})


class TokenMeanLoss(Metric):
    """Cross-entropy per target token over everything seen: sum of token losses / token count.

    Updated with ``update(loss_sum, num_tokens)`` per batch, so that batches with more target
    tokens weigh more (the mean of batch means would not be the corpus loss).
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("loss_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, loss_sum: torch.Tensor, num_tokens: torch.Tensor | int) -> None:
        self.loss_sum += loss_sum.detach().to(self.loss_sum.dtype)
        self.num_tokens += torch.as_tensor(num_tokens, device=self.num_tokens.device, dtype=torch.long)

    def compute(self) -> torch.Tensor:
        return (self.loss_sum / self.num_tokens.clamp(min=1)).float()


class TokenPerplexity(TokenMeanLoss):
    """exp of :class:`TokenMeanLoss`: the perplexity of the target tokens."""

    def compute(self) -> torch.Tensor:
        return torch.exp(self.loss_sum / self.num_tokens.clamp(min=1)).float()


def language_modeling_metrics() -> MetricCollection:
    """A fresh ``loss`` (token-weighted mean cross-entropy) and ``perplexity`` (its exp) collection,
    updated with ``update(loss_sum, num_tokens)``."""
    return MetricCollection({"loss": TokenMeanLoss(), "perplexity": TokenPerplexity()}, compute_groups=False)


# The metric that ranks runs of a task, in order of preference: the GLUE papers' metric of each
# task (CoLA: Matthews, STS-B: Pearson, MRPC and QQP: accuracy, as the configs' checkpoint
# monitor), then F1, then the loss (causal LMs).
_MAIN_METRICS = ("matthews", "pearson", "accuracy", "f1", "spearman", "loss", "perplexity")


def main_metric(names) -> tuple[str, str] | None:
    """``(name, mode)`` of the main validation metric among logged metric ``names`` (e.g.
    ``("val/accuracy", "max")``, ``("val_matched/accuracy", "max")`` for MNLI, ``("val/loss",
    "min")`` for a causal LM); None when there is no validation metric. Only the first validation
    set counts: ``val``, else ``val_matched``, else the first in sorted order."""
    names = {str(n) for n in names}
    prefixes = sorted({n.split("/", 1)[0] for n in names if n.startswith("val") and "/" in n})
    if not prefixes:
        return None
    prefix = "val" if "val" in prefixes else "val_matched" if "val_matched" in prefixes else prefixes[0]
    for key in _MAIN_METRICS:
        if f"{prefix}/{key}" in names:
            return f"{prefix}/{key}", ("min" if key in ("loss", "perplexity") else "max")
    return None
