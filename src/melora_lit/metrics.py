"""Evaluation metrics for the GLUE tasks and for a user's own text classification data.

Every collection is updated with ``metrics.update(preds, target)``: ``preds`` are predicted class
ids (int64) for classification and float scores for regression (STS-B). Keys are plain metric
names (``"accuracy"``, ``"f1"``, ``"matthews"``, ``"pearson"``, ``"spearman"``); callers add the
split prefix with ``MetricCollection.clone(prefix=...)``.
"""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryF1Score,
    BinaryMatthewsCorrCoef,
    MulticlassAccuracy,
    MulticlassF1Score,
)
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef

__all__ = ["GLUE_NUM_LABELS", "glue_metrics", "classification_metrics"]

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
        return MetricCollection({"pearson": PearsonCorrCoef(), "spearman": SpearmanCorrCoef()})
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
