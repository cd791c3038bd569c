"""Annotation metrics of the seed (per-class / per-image P, R, F1 and N+) and MCC thresholds.

Pure numpy on host arrays: targets are 0/1 [N, C], probs are sigmoid outputs [N, C]. Definitions
follow the seed's `EvaluationMetrics` exactly, including its 1e-7 guards, so that numbers are
comparable with the published tables. `evaluation_results` is the one place where predictions
become the reported evaluation (thresholds chosen on the threshold split: the training images, or
the validation images under protocol "validation"; metrics on test; per-label records).
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence

import numpy as np

EPSILON = 1e-7  # the seed's guard against empty denominators
MCC_GRID: np.ndarray = np.round(np.arange(0.05, 0.701, 0.05), 2)  # 0.05, 0.10, ..., 0.70


def _check_inputs(targets: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes/values; return targets as float64 and probs in their own float dtype
    (thresholds are compared in that dtype, as the seed's float32 tensors were)."""
    targets = np.asarray(targets, dtype=np.float64)
    probs = np.asarray(probs)
    if not np.issubdtype(probs.dtype, np.floating):
        probs = probs.astype(np.float64)
    if targets.ndim != 2 or targets.shape != probs.shape:
        raise ValueError(f"targets and probs must both be [N, C] of equal shape; got targets "
                         f"{targets.shape} and probs {probs.shape}")
    if not np.isin(targets, (0.0, 1.0)).all():
        raise ValueError("targets must contain only 0 and 1")
    if np.isnan(probs).any():
        raise ValueError("probs contain NaN")
    return targets, probs


def above_thresholds(probs: np.ndarray, thresholds: float | np.ndarray) -> np.ndarray:
    """The seed's hard predictions, as booleans: probs ([..., C]) > threshold (one scalar or one
    value per label), compared in the probabilities' dtype (a float64 threshold of 0.55 is below
    float32(0.55)); the metrics, the reports' picture and predict all decide with it."""
    probs = np.asarray(probs)
    thresholds = np.asarray(thresholds, dtype=probs.dtype)
    if thresholds.ndim != 0 and thresholds.shape != (probs.shape[-1],):
        raise ValueError(f"thresholds must be a scalar or have shape ({probs.shape[-1]},); got "
                         f"{thresholds.shape}")
    return probs > thresholds


def _predictions(probs: np.ndarray, thresholds: float | np.ndarray) -> np.ndarray:
    """above_thresholds as 0/1 floats, for the metrics' sums."""
    return above_thresholds(probs, thresholds).astype(np.float64)


def _f1(precision: np.ndarray | float, recall: np.ndarray | float) -> np.ndarray | float:
    """The seed's F1 with its epsilon: 2PR / (P + R + 1e-7)."""
    return 2 * precision * recall / (precision + recall + EPSILON)


def per_label_metrics(targets: np.ndarray, probs: np.ndarray,
                      thresholds: float | np.ndarray = 0.5) -> dict[str, np.ndarray]:
    """Per-label precision, recall, F1 (seed epsilons) and support (#positives), arrays of [C];
    for per-label tables and F1-vs-frequency plots. Their means are the per-class P and R."""
    targets, probs = _check_inputs(targets, probs)
    predicted = _predictions(probs, thresholds)
    true_positives = (targets * predicted).sum(axis=0)
    precision = true_positives / (predicted.sum(axis=0) + EPSILON)
    recall = true_positives / (targets.sum(axis=0) + EPSILON)
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
            "support": targets.sum(axis=0).astype(np.int64)}


def _seed_metrics(true_positives: np.ndarray, predicted: np.ndarray,
                  actual: np.ndarray) -> dict[str, np.ndarray]:
    """The seed's seven metrics from per-label counts [..., C] (true positives, predicted and
    actual positives), for one evaluation or a stack of bootstrap resamples."""
    per_class_precision = np.mean(true_positives / (predicted + EPSILON), axis=-1)
    per_class_recall = np.mean(true_positives / (actual + EPSILON), axis=-1)
    per_image_precision = true_positives.sum(axis=-1) / (predicted.sum(axis=-1) + EPSILON)
    per_image_recall = true_positives.sum(axis=-1) / (actual.sum(axis=-1) + EPSILON)
    return {
        "per_class_precision": per_class_precision,
        "per_class_recall": per_class_recall,
        "per_class_f1": _f1(per_class_precision, per_class_recall),
        "per_image_precision": per_image_precision,
        "per_image_recall": per_image_recall,
        "per_image_f1": _f1(per_image_precision, per_image_recall),
        "n_plus": (true_positives > 0).sum(axis=-1),
    }


def annotation_metrics(targets: np.ndarray, probs: np.ndarray,
                       thresholds: float | np.ndarray = 0.5) -> dict[str, float | int]:
    """The seed's seven annotation metrics as JSON-ready Python numbers: per-class P/R (means over
    labels), per-class F1 (of those means), per-image P/R/F1 (all labels pooled), and N+."""
    targets, probs = _check_inputs(targets, probs)
    predicted = _predictions(probs, thresholds)
    values = _seed_metrics((targets * predicted).sum(axis=0), predicted.sum(axis=0),
                           targets.sum(axis=0))
    return {name: int(value) if name == "n_plus" else float(value)
            for name, value in values.items()}


def bootstrap_ci(targets: np.ndarray, probs: np.ndarray, thresholds: float | np.ndarray, *,
                 resamples: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float]]:
    """Bootstrap intervals of the seven metrics over the images: the metric on all images
    +- z(level) bootstrap standard deviations (Efron's standard interval), where resample i takes
    the images in row i of `np.random.default_rng(seed).integers(0, N, (resamples, N))`.

    Not the percentile interval: a resample holds only about 63% of the distinct images, so
    labels with one or two test images drop out of it, and N+ and the per-class metrics of the
    resamples lie mostly below the value on the whole test set (on Corel-5k the percentile
    interval of N+ does not contain N+). Their spread still measures the test set's sampling
    noise; it is centred on the value reported."""
    targets, probs = _check_inputs(targets, probs)
    predicted = _predictions(probs, thresholds)
    num_images = len(targets)
    indices = np.random.default_rng(seed).integers(0, num_images, (resamples, num_images))
    counts = np.zeros((resamples + 1, num_images))
    counts[0] = 1.0  # row 0: the whole test set once
    np.add.at(counts, (1 + np.arange(resamples)[:, None], indices), 1.0)  # image multiplicities
    values = _seed_metrics(counts @ (targets * predicted), counts @ predicted, counts @ targets)
    z = statistics.NormalDist().inv_cdf(0.5 + level / 2)
    intervals = {}
    for name, value in values.items():
        half_width = z * np.std(value[1:].astype(np.float64), ddof=1)
        intervals[name] = [float(value[0] - half_width), float(value[0] + half_width)]
    return intervals


def mcc_thresholds(targets: np.ndarray, probs: np.ndarray,
                   grid: np.ndarray | tuple[float, ...] = MCC_GRID) -> np.ndarray:
    """Per label, the grid threshold with the highest Matthews correlation of (probs >= t) with the
    targets (MCC 0 where undefined, ties to the smallest t): the seed's threshold tuning, [C].
    As in the seed, thresholds are chosen with >= and applied with > (`_predictions`); the two
    differ only for a probability exactly equal to a grid value."""
    targets, probs = _check_inputs(targets, probs)
    grid = np.sort(np.asarray(grid, dtype=np.float64).ravel())
    if grid.size == 0:
        raise ValueError("mcc_thresholds needs a non-empty grid")
    truth = targets.astype(bool)
    predicted = probs[None, :, :] >= grid.astype(probs.dtype)[:, None, None]  # [G, N, C]
    true_pos = np.sum(predicted & truth, axis=1).astype(np.float64)  # [G, C]
    pred_pos = predicted.sum(axis=1).astype(np.float64)
    actual_pos = truth.sum(axis=0).astype(np.float64)[None, :]
    n = float(targets.shape[0])
    false_pos = pred_pos - true_pos
    false_neg = actual_pos - true_pos
    true_neg = n - true_pos - false_pos - false_neg
    denominator = pred_pos * actual_pos * (n - actual_pos) * (n - pred_pos)
    numerator = true_pos * true_neg - false_pos * false_neg
    mcc = np.where(denominator > 0, numerator / np.sqrt(np.where(denominator > 0, denominator, 1)),
                   0.0)
    return grid[np.argmax(mcc, axis=0)]  # argmax returns the first (smallest t) on ties


def evaluation_results(threshold_targets: np.ndarray, threshold_probs: np.ndarray,
                       test_targets: np.ndarray, test_probs: np.ndarray,
                       vocabulary: Sequence[str], *, train_counts: np.ndarray | None = None,
                       resamples: int = 1000, seed: int = 0) -> dict:
    """The seed's evaluation of predictions: per-label MCC thresholds chosen on the threshold
    split (the training images; the validation images under the "validation" protocol), test
    metrics at 0.5 and at those thresholds with their 95% bootstrap intervals over test images
    ("ci95"), the thresholds, and one record per label (training count, test count, threshold,
    P/R/F1). `train_counts` [C] defaults to the threshold split's label counts."""
    thresholds = mcc_thresholds(threshold_targets, threshold_probs)
    at_mcc = per_label_metrics(test_targets, test_probs, thresholds)
    at_half = per_label_metrics(test_targets, test_probs, 0.5)
    if train_counts is None:
        train_counts = np.asarray(threshold_targets).sum(axis=0)
    train_counts = np.asarray(train_counts).astype(int)
    per_label = [{"label": label, "train_count": int(train_counts[i]),
                  "test_count": int(at_mcc["support"][i]), "threshold": float(thresholds[i]),
                  "precision": float(at_mcc["precision"][i]), "recall": float(at_mcc["recall"][i]),
                  "f1": float(at_mcc["f1"][i]), "f1_at_0.5": float(at_half["f1"][i])}
                 for i, label in enumerate(vocabulary)]
    return {"fixed_0.5": annotation_metrics(test_targets, test_probs, 0.5),
            "mcc": annotation_metrics(test_targets, test_probs, thresholds),
            "ci95": {name: bootstrap_ci(test_targets, test_probs, threshold_value,
                                        resamples=resamples, seed=seed)
                     for name, threshold_value in (("fixed_0.5", 0.5), ("mcc", thresholds))},
            "thresholds": [float(t) for t in thresholds],
            "per_label": per_label}
