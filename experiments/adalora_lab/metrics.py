"""GLUE evaluation metrics.

All numbers are computed by scikit-learn (accuracy, F1, Matthews correlation) and
SciPy (Pearson, Spearman); nothing is re-implemented here. The conventions follow
the GLUE benchmark and the AdaLoRA paper (Zhang et al., 2023, Table 1):

======  ===========================  ===============
task    metrics returned             ``MAIN_METRIC``
======  ===========================  ===============
sst2    accuracy                     accuracy
rte     accuracy                     accuracy
qnli    accuracy                     accuracy
mnli    accuracy (matched dev)       accuracy
mrpc    accuracy, f1                 accuracy
qqp     accuracy, f1                 accuracy
cola    matthews                     matthews
stsb    pearson, spearman            pearson
======  ===========================  ===============

F1 is binary F1 of the positive class (label 1: "equivalent" for MRPC,
"duplicate" for QQP), as in GLUE.

Example::

    >>> compute_metrics("rte", logits, labels)   # logits: (N, 2), labels: (N,)
    {'accuracy': 0.7075812274368231}
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

__all__ = ["TASK_METRICS", "MAIN_METRIC", "REGRESSION_TASKS", "MAJORITY_CLASS", "compute_metrics",
           "majority_class_accuracy"]

TASK_METRICS: dict[str, list[str]] = {
    "sst2": ["accuracy"],
    "rte": ["accuracy"],
    "qnli": ["accuracy"],
    "mnli": ["accuracy"],
    "mrpc": ["accuracy", "f1"],
    "qqp": ["accuracy", "f1"],
    "cola": ["matthews"],
    "stsb": ["pearson", "spearman"],
}
"""Metrics returned by :func:`compute_metrics` for each task (keys of the returned dict)."""

MAIN_METRIC: dict[str, str] = {
    "sst2": "accuracy",
    "rte": "accuracy",
    "qnli": "accuracy",
    "mnli": "accuracy",
    "mrpc": "accuracy",
    "qqp": "accuracy",
    "cola": "matthews",
    "stsb": "pearson",
}
"""The single metric reported in result tables / used for model selection (higher is better for all)."""

REGRESSION_TASKS: frozenset[str] = frozenset({"stsb"})


def _check_task(task: str) -> str:
    key = task.lower().replace("-", "").replace("_", "")
    if key not in TASK_METRICS:
        raise ValueError(f"unknown GLUE task {task!r}; known tasks: {', '.join(sorted(TASK_METRICS))}")
    return key


def _class_predictions(task: str, preds: np.ndarray, n: int) -> np.ndarray:
    """(N, C) logits -> (N,) argmax ids; (N,) integer class ids pass through."""
    if preds.ndim == 2 and preds.shape[1] >= 2:
        return preds.argmax(axis=1)
    if preds.ndim == 1 and np.issubdtype(preds.dtype, np.integer):
        return preds
    raise ValueError(
        f"{task}: expected classification logits of shape (N, C) with C >= 2 (or (N,) integer class ids), "
        f"got shape {preds.shape} dtype {preds.dtype}"
    )


def _correlation(fn, x: np.ndarray, y: np.ndarray) -> float:
    """Correlation via SciPy; 0.0 (not NaN) when either input is constant, where it is undefined."""
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        r = float(fn(x, y)[0])
    return 0.0 if np.isnan(r) else r


def compute_metrics(task: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Compute the GLUE metrics of ``task``.

    Args:
        task: one of ``TASK_METRICS`` (``"sst2"``, ``"rte"``, ...; ``"SST-2"``/``"sts_b"`` spellings accepted).
        preds: model outputs. Classification: logits (or probabilities) of shape ``(N, C)``; the
            prediction is their argmax. ``(N,)`` *integer* arrays are taken as already-decoded class ids.
            Regression (``stsb``): scores of shape ``(N,)`` or ``(N, 1)``. Torch tensors are accepted
            (converted with ``np.asarray``; move them to CPU first).
        labels: gold labels, shape ``(N,)`` (class ids, or float scores for ``stsb``).

    Returns:
        ``{metric_name: value}`` with the keys of ``TASK_METRICS[task]``, values as plain Python floats.
        Accuracy/F1 are in [0, 1]; Matthews/Pearson/Spearman in [-1, 1].

    Notes:
        * Pearson/Spearman are undefined when the predictions (or labels) are constant, e.g. a
          collapsed regressor early in training; SciPy returns NaN there. We return ``0.0`` instead so
          that model selection and logging keep working (a constant predictor has no correlation).
        * Matthews correlation with a single predicted class is 0.0 (scikit-learn's convention).
        * F1 with no positive predictions is 0.0 (``zero_division=0``).

    Raises:
        ValueError: unknown task, mismatched lengths, empty input, wrong shapes, or non-finite
            predictions (NaN/inf usually means training diverged).
    """
    key = _check_task(task)
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.ndim != 1:
        raise ValueError(f"{task}: labels must have shape (N,), got {labels.shape}")
    n = labels.shape[0]
    if n == 0:
        raise ValueError(f"{task}: cannot compute metrics on an empty evaluation set")
    if preds.shape[0] != n:
        raise ValueError(f"{task}: {preds.shape[0]} predictions but {n} labels")
    if np.issubdtype(preds.dtype, np.floating) and not np.all(np.isfinite(preds)):
        raise ValueError(f"{task}: predictions contain NaN or inf (did training diverge?)")

    if key in REGRESSION_TASKS:
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if preds.ndim != 1:
            raise ValueError(f"{task}: regression predictions must have shape (N,) or (N, 1), got {preds.shape}")
        x = preds.astype(np.float64)
        y = labels.astype(np.float64)
        return {
            "pearson": _correlation(stats.pearsonr, x, y),
            "spearman": _correlation(stats.spearmanr, x, y),
        }

    y_pred = _class_predictions(task, preds, n)
    y_true = labels.astype(np.int64)
    out: dict[str, float] = {}
    for metric in TASK_METRICS[key]:
        if metric == "accuracy":
            out[metric] = float(accuracy_score(y_true, y_pred))
        elif metric == "f1":
            out[metric] = float(f1_score(y_true, y_pred, pos_label=1, average="binary", zero_division=0))
        elif metric == "matthews":
            out[metric] = float(matthews_corrcoef(y_true, y_pred))
        else:  # pragma: no cover - guarded by TASK_METRICS
            raise AssertionError(metric)
    return out


MAJORITY_CLASS: dict[str, float] = {"sst2": 444 / 872, "mrpc": 279 / 408, "rte": 146 / 277}
"""Dev accuracy of always predicting the most frequent dev label, for the full GLUE dev sets: SST-2 50.9%
(444 positive of 872), MRPC 68.4% (279 equivalent of 408), RTE 52.7% (146 not_entailment of 277). The chance
level drawn in comparisons when the dev labels themselves are not at hand."""


def majority_class_accuracy(labels) -> float:
    """Accuracy of always predicting the most frequent of ``labels`` (class ids, shape (N,))."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"labels must be a non-empty (N,) array, got shape {labels.shape}")
    _, counts = np.unique(labels, return_counts=True)
    return float(counts.max() / labels.size)
