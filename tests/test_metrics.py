"""Metrics against a hand-computed example, scikit-learn (precision/recall/F1, MCC), and a loop
transcription of the seed's threshold search."""
from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.metrics import f1_score, matthews_corrcoef, precision_recall_fscore_support

from annotate.metrics import (MCC_GRID, annotation_metrics, bootstrap_ci, mcc_thresholds,
                              per_label_metrics)

SEED_GRID = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7]


@pytest.fixture(scope="module")
def predictions():
    """Random sparse targets with degenerate labels: one never positive, one never predicted."""
    rng = np.random.default_rng(1)
    targets = (rng.random((60, 12)) < 0.3).astype(np.float32)
    probs = np.clip(0.45 * targets + 0.6 * rng.random((60, 12)), 0, 1).astype(np.float32)
    targets[:, 3] = 0.0       # label never present
    probs[:, 5] = 0.2         # label never predicted at 0.5
    targets[:, 7] = 1.0       # label present everywhere
    return targets, probs


def test_hand_computed_example():
    targets = np.array([[1, 0, 1], [0, 1, 1], [1, 0, 0], [0, 0, 1]])
    probs = np.array([[0.9, 0.6, 0.4], [0.2, 0.7, 0.8], [0.5, 0.1, 0.3], [0.6, 0.2, 0.9]])
    # predicted (> 0.5): [[1,1,0],[0,1,1],[0,0,0],[1,0,1]] (0.5 itself is not a prediction)
    # label 0: tp 1, predicted 2, positives 2;  label 1: tp 1, predicted 2, positives 1;
    # label 2: tp 2, predicted 2, positives 3
    result = annotation_metrics(targets, probs)
    precision, recall = (0.5 + 0.5 + 1.0) / 3, (0.5 + 1.0 + 2 / 3) / 3
    assert result["per_class_precision"] == pytest.approx(precision, abs=1e-6)
    assert result["per_class_recall"] == pytest.approx(recall, abs=1e-6)
    assert result["per_class_f1"] == pytest.approx(2 * precision * recall / (precision + recall),
                                                   abs=1e-6)
    assert result["per_image_precision"] == pytest.approx(4 / 6, abs=1e-6)
    assert result["per_image_recall"] == pytest.approx(4 / 6, abs=1e-6)
    assert result["per_image_f1"] == pytest.approx(4 / 6, abs=1e-6)
    assert result["n_plus"] == 3
    # per-label thresholds: label 0 at 0.55 keeps only 0.9 and 0.6 (tp 1 of 2 predicted) -> same;
    # label 2 at 0.85 keeps only 0.9 (tp 1, pred 1, pos 3)
    per_label = annotation_metrics(targets, probs, np.array([0.55, 0.5, 0.85]))
    assert per_label["per_class_precision"] == pytest.approx((0.5 + 0.5 + 1.0) / 3, abs=1e-6)
    assert per_label["per_class_recall"] == pytest.approx((0.5 + 1.0 + 1 / 3) / 3, abs=1e-6)
    assert per_label["per_image_precision"] == pytest.approx(3 / 5, abs=1e-6)


def test_thresholds_are_compared_in_the_probabilities_dtype():
    """float32 probabilities against a grid threshold, as the seed's float32 tensors: float32
    0.55 is not above float32 0.55 (in float64 it is above 0.55, a false positive here)."""
    targets = np.array([[0], [1]])
    probs = np.array([[0.55], [0.9]], np.float32)
    for thresholds in (0.55, np.array([0.55])):
        assert annotation_metrics(targets, probs, thresholds)["per_class_precision"] == (
            pytest.approx(1.0, abs=1e-6))


def test_annotation_metrics_match_sklearn(predictions):
    targets, probs = predictions
    rng = np.random.default_rng(2)
    for thresholds in (0.5, rng.uniform(0.2, 0.7, targets.shape[1])):
        predicted = (probs > thresholds).astype(int)
        macro_p, macro_r, _, _ = precision_recall_fscore_support(
            targets.astype(int), predicted, average="macro", zero_division=0)
        micro_p, micro_r, micro_f1, _ = precision_recall_fscore_support(
            targets.astype(int), predicted, average="micro", zero_division=0)
        recall_per_label = precision_recall_fscore_support(
            targets.astype(int), predicted, average=None, zero_division=0)[1]
        result = annotation_metrics(targets, probs, thresholds)
        assert result["per_class_precision"] == pytest.approx(macro_p, abs=1e-6)
        assert result["per_class_recall"] == pytest.approx(macro_r, abs=1e-6)
        assert result["per_class_f1"] == pytest.approx(
            2 * macro_p * macro_r / (macro_p + macro_r), abs=1e-6)
        assert result["per_image_precision"] == pytest.approx(micro_p, abs=1e-6)
        assert result["per_image_recall"] == pytest.approx(micro_r, abs=1e-6)
        assert result["per_image_f1"] == pytest.approx(micro_f1, abs=1e-6)
        assert result["n_plus"] == int((recall_per_label > 0).sum())


def test_per_label_metrics_match_sklearn(predictions):
    targets, probs = predictions
    precision, recall, f1, support = precision_recall_fscore_support(
        targets.astype(int), (probs > 0.5).astype(int), average=None, zero_division=0)
    result = per_label_metrics(targets, probs)
    np.testing.assert_allclose(result["precision"], precision, atol=1e-6)
    np.testing.assert_allclose(result["recall"], recall, atol=1e-6)
    np.testing.assert_allclose(result["f1"], f1, atol=1e-6)
    np.testing.assert_array_equal(result["support"], support)
    summary = annotation_metrics(targets, probs)
    assert summary["per_class_precision"] == pytest.approx(result["precision"].mean(), abs=1e-12)


def test_metrics_are_json_serialisable(predictions):
    result = annotation_metrics(*predictions)
    assert set(result) == {"per_class_precision", "per_class_recall", "per_class_f1",
                           "per_image_precision", "per_image_recall", "per_image_f1", "n_plus"}
    assert type(result["n_plus"]) is int
    assert all(type(v) is float for k, v in result.items() if k != "n_plus")
    assert json.loads(json.dumps(result)) == result


def test_bad_inputs_raise(predictions):
    targets, probs = predictions
    with pytest.raises(ValueError, match="equal shape"):
        annotation_metrics(targets, probs[:, :-1])
    with pytest.raises(ValueError, match="thresholds must be a scalar"):
        annotation_metrics(targets, probs, np.full(3, 0.5))
    with pytest.raises(ValueError, match="only 0 and 1"):
        per_label_metrics(targets * 2, probs)
    with pytest.raises(ValueError, match="equal shape"):
        mcc_thresholds(targets[:, 0], probs[:, 0])


def seed_mcc_thresholds(targets, probs):
    """The seed's Engine.matthew_corrcoef loop, with sklearn's MCC."""
    best = []
    for label in range(targets.shape[1]):
        scores = []
        for threshold in SEED_GRID:
            hold = probs[:, label].copy()
            hold[hold >= threshold] = 1
            hold[hold < threshold] = 0
            scores.append(matthews_corrcoef(targets[:, label], hold))
        best.append(SEED_GRID[int(np.argmax(scores))])
    return np.array(best)


def test_default_grid_is_the_seeds():
    np.testing.assert_array_equal(MCC_GRID, SEED_GRID)


def test_mcc_thresholds_match_seed_loop_with_sklearn(predictions):
    targets, probs = predictions
    probs = probs.copy()
    probs[:, 9] = 0.3                                     # constant prediction
    probs[:10, 10] = np.array(SEED_GRID[:10])             # probabilities exactly on the grid
    probs[:, 11] = np.round(probs[:, 11] * 20) / 20       # on-grid float32 values: compared in
    #                                                       float32 as the seed did (0.65f < 0.65)
    expected = seed_mcc_thresholds(targets, probs)
    np.testing.assert_array_equal(mcc_thresholds(targets, probs), expected)
    assert expected[3] == 0.05 and expected[7] == 0.05 and expected[9] == 0.05  # MCC 0 -> first


def test_mcc_thresholds_recover_separating_threshold():
    rng = np.random.default_rng(3)
    targets = (rng.random((200, 4)) < 0.4).astype(np.float32)
    cut = np.array([0.1, 0.3, 0.45, 0.7])  # grid values: probs >= cut separate perfectly
    probs = np.where(targets == 1, rng.uniform(cut, 1.0, (200, 4)), rng.uniform(0, cut, (200, 4)))
    # perfect separation is reached by every grid value in (max negative, min positive];
    # ties go to the smallest such value.
    expected = [min(t for t in SEED_GRID if t > probs[targets[:, j] == 0, j].max())
                for j in range(4)]
    np.testing.assert_allclose(mcc_thresholds(targets, probs), expected)


@pytest.mark.parametrize("thresholds", ["half", "per_label"])
def test_bootstrap_interval_equals_a_direct_resampling_loop(predictions, thresholds):
    """The same index draws (default_rng(seed).integers(0, N, (R, N))), scored one resample at a
    time with sklearn's pooled F1, the seed's per-class F1 of mean P and R, and N+ counted
    directly; each interval the value on all images -+ 1.96 sd of the resampled values, which
    contains the value even for N+, whose resamples lie below it (rare labels drop out)."""
    targets, probs = predictions
    cut = 0.5 if thresholds == "half" else np.linspace(0.3, 0.6, targets.shape[1])
    interval = bootstrap_ci(targets, probs, cut, resamples=200, seed=7)
    draws = np.random.default_rng(7).integers(0, len(targets), (200, len(targets)))
    per_image_f1, per_class_f1, n_plus = [], [], []
    for rows in draws:
        y, predicted = targets[rows], (probs[rows] > cut).astype(int)
        per_image_f1.append(f1_score(y, predicted, average="micro", zero_division=0))
        true_positives = (y * predicted).sum(axis=0)
        precision = np.mean(true_positives / (predicted.sum(axis=0) + 1e-7))
        recall = np.mean(true_positives / (y.sum(axis=0) + 1e-7))
        per_class_f1.append(2 * precision * recall / (precision + recall + 1e-7))
        n_plus.append(int((true_positives > 0).sum()))
    for name, values in (("per_image_f1", per_image_f1), ("per_class_f1", per_class_f1),
                         ("n_plus", n_plus)):
        point = annotation_metrics(targets, probs, cut)[name]
        half_width = 1.959964 * np.std(values, ddof=1)
        np.testing.assert_allclose(interval[name], [point - half_width, point + half_width],
                                   rtol=1e-5, err_msg=name)
    assert bootstrap_ci(targets, probs, cut, resamples=200, seed=8) != interval


def test_bootstrap_interval_of_n_plus_is_centred_on_the_value_with_rare_labels():
    """50 labels with one test image each, all found: N+ = 50 on the test set, while a resample
    holds about 63% of the images (N+ about 32, nearly never 50). The interval is centred on 50
    and as wide as 1.96 sd of the resampled N+: at most the binomial sd (50 x 0.63 x 0.37)^0.5
    = 3.4, as the images of one resample are drawn against each other (about 2.8 here)."""
    targets = np.zeros((100, 50), np.float32)
    targets[np.arange(50), np.arange(50)] = 1.0
    probs = np.where(targets == 1, 0.9, 0.1).astype(np.float32)
    low, high = bootstrap_ci(targets, probs, 0.5, resamples=400, seed=0)["n_plus"]
    assert (low + high) / 2 == pytest.approx(50.0)
    assert 2 * 1.96 * 2.0 < high - low < 2 * 1.96 * 3.45
