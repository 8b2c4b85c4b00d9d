"""GLUE metrics: checked against closed-form values, not by re-calling scikit-learn."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from adalora_lab.metrics import MAIN_METRIC, MAJORITY_CLASS, TASK_METRICS, compute_metrics, majority_class_accuracy

ALL_TASKS = ["sst2", "rte", "mrpc", "cola", "stsb", "qnli", "mnli", "qqp"]


def one_hot_logits(pred_ids, num_classes=2):
    """Logits whose argmax is ``pred_ids`` (with some noise so they are not trivially one-hot)."""
    pred_ids = np.asarray(pred_ids)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(len(pred_ids), num_classes)).astype(np.float32)
    logits[np.arange(len(pred_ids)), pred_ids] = 10.0
    return logits


def test_registry_is_complete_and_consistent():
    assert set(TASK_METRICS) == set(ALL_TASKS)
    assert set(MAIN_METRIC) == set(ALL_TASKS)
    for task in ALL_TASKS:
        assert MAIN_METRIC[task] in TASK_METRICS[task]
    assert TASK_METRICS["mrpc"] == ["accuracy", "f1"]
    assert TASK_METRICS["qqp"] == ["accuracy", "f1"]
    assert TASK_METRICS["cola"] == ["matthews"]
    assert TASK_METRICS["stsb"] == ["pearson", "spearman"]
    assert MAIN_METRIC["cola"] == "matthews" and MAIN_METRIC["stsb"] == "pearson"
    assert MAIN_METRIC["mrpc"] == "accuracy"


@pytest.mark.parametrize("task", ALL_TASKS)
def test_perfect_predictions_score_one(task):
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    if task == "stsb":
        labels = np.array([0.0, 1.2, 3.4, 5.0, 2.2, 4.1, 0.5, 2.9])
        preds = labels.copy()
    elif task == "mnli":
        labels = np.array([0, 1, 2, 2, 1, 0, 2, 1])
        preds = one_hot_logits(labels, 3)
    else:
        preds = one_hot_logits(labels)
    out = compute_metrics(task, preds, labels)
    assert list(out) == TASK_METRICS[task]
    for name, value in out.items():
        assert type(value) is float, (name, type(value))
        assert value == pytest.approx(1.0), name


def test_accuracy_and_f1_closed_form():
    # TP = 3 (idx 0,1,2), FN = 1 (idx 3), FP = 2 (idx 4,5), TN = 4 (idx 6..9)
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    pred_ids = np.array([1, 1, 1, 0, 1, 1, 0, 0, 0, 0])
    tp, fn, fp, tn = 3, 1, 2, 4
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    f1 = 2 * precision * recall / (precision + recall)  # = 2*TP / (2*TP + FP + FN) = 6/9
    assert f1 == pytest.approx(6 / 9)
    for task in ("mrpc", "qqp"):
        out = compute_metrics(task, one_hot_logits(pred_ids), labels)
        assert out["accuracy"] == pytest.approx((tp + tn) / 10)
        assert out["f1"] == pytest.approx(f1)
    assert compute_metrics("rte", one_hot_logits(pred_ids), labels) == {"accuracy": pytest.approx(0.7)}
    # (N,) integer predictions are taken as class ids
    assert compute_metrics("sst2", pred_ids, labels)["accuracy"] == pytest.approx(0.7)


def test_f1_is_zero_without_positive_predictions():
    labels = np.array([1, 0, 1, 0])
    out = compute_metrics("mrpc", one_hot_logits([0, 0, 0, 0]), labels)
    assert out == {"accuracy": 0.5, "f1": 0.0}


def test_matthews_closed_form():
    tp, tn, fp, fn = 6, 3, 1, 2
    labels = np.array([1] * tp + [0] * tn + [0] * fp + [1] * fn)
    pred_ids = np.array([1] * tp + [0] * tn + [1] * fp + [0] * fn)
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    out = compute_metrics("cola", one_hot_logits(pred_ids), labels)
    assert out["matthews"] == pytest.approx(expected)
    # fully inverted predictions -> -1
    assert compute_metrics("cola", one_hot_logits(1 - labels), labels)["matthews"] == pytest.approx(-1.0)


def test_matthews_constant_predictions_is_zero():
    labels = np.array([1, 0, 1, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn may warn; we only care about the value
        out = compute_metrics("cola", one_hot_logits([1, 1, 1, 1]), labels)
    assert out["matthews"] == 0.0


def test_pearson_spearman_closed_form():
    x = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    assert compute_metrics("stsb", x, 2 * x + 1) == {"pearson": pytest.approx(1.0), "spearman": pytest.approx(1.0)}
    neg = compute_metrics("stsb", x.reshape(-1, 1), -x)  # (N, 1) predictions accepted
    assert neg == {"pearson": pytest.approx(-1.0), "spearman": pytest.approx(-1.0)}
    # Monotone but non-linear: Spearman is exactly 1, Pearson below 1.
    out = compute_metrics("stsb", x, x**3)
    assert out["spearman"] == pytest.approx(1.0)
    assert out["pearson"] < 0.99
    # Pearson closed form for a small case: x = [1,2,3], y = [1,3,2] -> r = 0.5
    assert compute_metrics("stsb", np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0]))["pearson"] == pytest.approx(
        0.5
    )


def test_constant_regression_predictions_give_zero_not_nan():
    labels = np.array([0.5, 1.5, 3.0, 4.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConstantInputWarning leaks out
        out = compute_metrics("stsb", np.full(4, 2.5), labels)
    assert out == {"pearson": 0.0, "spearman": 0.0}


def test_accepts_torch_tensors_and_task_spellings():
    torch = pytest.importorskip("torch")
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2]])
    assert compute_metrics("SST-2", logits, torch.tensor([1, 0])) == {"accuracy": 1.0}
    out = compute_metrics("sts_b", torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 6.0]))
    assert out["pearson"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("task", "preds", "labels", "match"),
    [
        ("nope", np.zeros((2, 2)), np.zeros(2), "unknown GLUE task"),
        ("rte", np.zeros((3, 2)), np.zeros(2), "3 predictions but 2 labels"),
        ("rte", np.zeros((0, 2)), np.zeros(0), "empty"),
        ("rte", np.array([0.2, 0.7]), np.zeros(2), r"shape \(N, C\)"),
        ("stsb", np.zeros((2, 3)), np.zeros(2), r"\(N,\) or \(N, 1\)"),
        ("rte", np.array([[np.nan, 0.0], [0.0, 1.0]]), np.zeros(2), "NaN"),
    ],
)
def test_bad_inputs_raise(task, preds, labels, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(task, preds, labels)


def test_majority_class_accuracy():
    assert majority_class_accuracy([0, 1, 1, 1]) == 0.75
    assert majority_class_accuracy(np.array([2, 0, 2, 1, 2])) == pytest.approx(3 / 5)
    assert majority_class_accuracy([1]) == 1.0
    # what predicting that class scores, by compute_metrics
    labels = np.array([0, 1, 1, 0, 1, 1, 1])
    assert majority_class_accuracy(labels) == compute_metrics("rte", np.ones(7, dtype=np.int64), labels)["accuracy"]
    with pytest.raises(ValueError, match="non-empty"):
        majority_class_accuracy([])


def test_majority_class_table_is_the_glue_dev_sets():
    """The fallback chance levels: SST-2 50.9%, MRPC 68.4%, RTE 52.7% of their full dev sets."""
    assert {t: round(100 * v, 1) for t, v in MAJORITY_CLASS.items()} == {"sst2": 50.9, "mrpc": 68.4, "rte": 52.7}
    assert set(MAJORITY_CLASS) <= set(MAIN_METRIC) and all(MAIN_METRIC[t] == "accuracy" for t in MAJORITY_CLASS)
