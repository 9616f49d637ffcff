"""GLUE and classification metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from melora_lit.metrics import GLUE_NUM_LABELS, classification_metrics, glue_metrics

# A fixed binary example:
#   index   0 1 2 3 4 5 6 7
#   preds   1 1 0 0 1 0 1 1
#   target  1 0 0 0 1 1 1 1
# TP = 4 (0, 4, 6, 7), FP = 1 (1), TN = 2 (2, 3), FN = 1 (5)
BIN_PREDS = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1])
BIN_TARGET = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1])


def _compute(metrics, preds, target) -> dict[str, float]:
    metrics.update(preds, target)
    return {k: float(v) for k, v in metrics.compute().items()}


def test_cola_matthews_correlation():
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    #     = (4*2 - 1*1) / sqrt(5 * 5 * 3 * 3) = 7 / 15
    result = _compute(glue_metrics("cola"), BIN_PREDS, BIN_TARGET)
    assert set(result) == {"matthews"}
    assert result["matthews"] == pytest.approx(7 / 15, abs=1e-6)


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_paraphrase_accuracy_and_f1_of_class_1(task):
    # accuracy = (TP + TN) / 8 = 6/8; P = TP/(TP+FP) = 4/5, R = TP/(TP+FN) = 4/5,
    # F1 = 2PR/(P+R) = 0.8
    result = _compute(glue_metrics(task), BIN_PREDS, BIN_TARGET)
    assert result == pytest.approx({"accuracy": 0.75, "f1": 0.8}, abs=1e-6)


def test_f1_is_of_the_positive_class_only():
    # Swapping the classes: now class 1 has TP = 2, FP = 1, FN = 1 -> P = R = 2/3, F1 = 2/3.
    # (A macro F1 would stay (0.8 + 2/3)/2 under the swap.)
    result = _compute(glue_metrics("mrpc"), 1 - BIN_PREDS, 1 - BIN_TARGET)
    assert result["f1"] == pytest.approx(2 / 3, abs=1e-6)


def test_stsb_pearson_and_spearman():
    # Pearson, x = [1, 2, 3, 4], y = [2, 4, 5, 9]: means 2.5 and 5,
    # dx = [-1.5, -.5, .5, 1.5], dy = [-3, -1, 0, 4],
    # r = sum(dx*dy) / sqrt(sum dx^2 * sum dy^2) = 11 / sqrt(5 * 26)
    metrics = glue_metrics("stsb")
    result = _compute(metrics, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([2.0, 4.0, 5.0, 9.0]))
    assert result["pearson"] == pytest.approx(11 / math.sqrt(130), abs=1e-5)
    # Spearman = Pearson of ranks; y = [10, 30, 20, 40] ranks [1, 3, 2, 4] vs [1, 2, 3, 4]:
    # d = [0, -1, 1, 0], rho = 1 - 6 * sum d^2 / (n (n^2 - 1)) = 1 - 12/60 = 0.8
    metrics = glue_metrics("stsb")
    result = _compute(metrics, torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 30.0, 20.0, 40.0]))
    assert result["spearman"] == pytest.approx(0.8, abs=1e-5)
    assert result["pearson"] < 0.9  # the raw values are not perfectly linear


def test_mnli_accuracy_is_plain_accuracy_over_three_classes():
    # 4 of 6 right -> 2/3. Macro accuracy (mean per-class recall) would be
    # (2/3 + 1/2 + 1/1) / 3 = 0.722..., so this catches torchmetrics' macro default.
    preds = torch.tensor([0, 1, 2, 2, 1, 0])
    target = torch.tensor([0, 1, 1, 2, 0, 0])
    result = _compute(glue_metrics("mnli"), preds, target)
    assert result == pytest.approx({"accuracy": 4 / 6}, abs=1e-6)


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte", "wnli"])
def test_other_tasks_report_accuracy(task):
    result = _compute(glue_metrics(task), BIN_PREDS, BIN_TARGET)
    assert result == pytest.approx({"accuracy": 0.75}, abs=1e-6)


def test_every_task_has_metrics_and_collections_are_fresh():
    for task in GLUE_NUM_LABELS:
        assert len(glue_metrics(task)) >= 1
    first, second = glue_metrics("rte"), glue_metrics("rte")
    first.update(BIN_PREDS, BIN_TARGET)
    second.update(torch.tensor([1, 1]), torch.tensor([1, 1]))
    assert float(second.compute()["accuracy"]) == 1.0


def test_classification_accuracy_and_macro_f1():
    # preds  0 0 1 1 2 2 2     target 0 1 1 1 2 2 0
    # class 0: TP 1, FP 1, FN 1 -> F1 = 2*1/(2*1+1+1) = 0.5
    # class 1: TP 2, FP 0, FN 1 -> F1 = 4/5 = 0.8
    # class 2: TP 2, FP 1, FN 0 -> F1 = 4/5 = 0.8
    # macro F1 = (0.5 + 0.8 + 0.8)/3 = 0.7; accuracy = 5/7
    preds = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    target = torch.tensor([0, 1, 1, 1, 2, 2, 0])
    result = _compute(classification_metrics(3), preds, target)
    assert result == pytest.approx({"accuracy": 5 / 7, "f1": 0.7}, abs=1e-6)


def test_bad_arguments_raise_one_line_value_errors():
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sst-2'.*sst2") as err:
        glue_metrics("sst-2")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="num_labels must be an integer >= 2"):
        classification_metrics(1)
