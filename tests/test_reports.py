"""annotate.reports (the results.md tables, the pictures) and metrics.evaluation_results (results.json's
content) against sklearn."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import f1_score, matthews_corrcoef, precision_score, recall_score

from annotate import metrics, reports

from configs import base  # noqa: E402

VOCABULARY = ["sky", "water", "tree", "grass", "people", "sand"]


@pytest.fixture(scope="module")
def predictions():
    """Synthetic train/test targets with probabilities that carry signal plus noise."""
    rng = np.random.default_rng(0)

    def split(n):
        targets = (rng.random((n, len(VOCABULARY))) < [0.4, 0.3, 0.3, 0.2, 0.15, 0.05]).astype(np.float32)
        probs = np.clip(0.35 * targets + 0.5 * rng.random(targets.shape), 0, 1).astype(np.float32)
        return targets, probs

    return split(80), split(40)


@pytest.fixture(scope="module")
def results(predictions):
    (train_targets, train_probs), (test_targets, test_probs) = predictions
    return metrics.evaluation_results(train_targets, train_probs, test_targets, test_probs, VOCABULARY)


def test_results_against_sklearn(predictions, results):
    (train_targets, train_probs), (test_targets, test_probs) = predictions
    grid = np.round(np.arange(0.05, 0.701, 0.05), 2)
    for label in range(len(VOCABULARY)):  # the seed's loop over sklearn's MCC, first best wins
        scores = [matthews_corrcoef(train_targets[:, label], train_probs[:, label] >= t) for t in grid]
        assert results["thresholds"][label] == pytest.approx(grid[int(np.argmax(scores))])
    thresholds = np.array(results["thresholds"])
    for key, predicted in (("fixed_0.5", test_probs > 0.5), ("mcc", test_probs > thresholds)):
        metrics = results[key]
        assert metrics["per_image_f1"] == pytest.approx(f1_score(test_targets, predicted, average="micro"), abs=1e-5)
        assert metrics["per_image_precision"] == pytest.approx(
            precision_score(test_targets, predicted, average="micro"), abs=1e-5)
        assert metrics["per_class_recall"] == pytest.approx(
            recall_score(test_targets, predicted, average="macro", zero_division=0), abs=1e-5)
        assert metrics["n_plus"] == int(((test_targets == 1) & predicted).any(axis=0).sum())
    per_label_f1 = f1_score(test_targets, test_probs > thresholds, average=None, zero_division=0)
    f1_at_half = f1_score(test_targets, test_probs > 0.5, average=None, zero_division=0)
    for i, row in enumerate(results["per_label"]):
        assert row["label"] == VOCABULARY[i]
        assert row["train_count"] == int(train_targets[:, i].sum())
        assert row["test_count"] == int(test_targets[:, i].sum())
        assert row["threshold"] == results["thresholds"][i]
        assert row["f1"] == pytest.approx(per_label_f1[i], abs=1e-5)
        assert row["f1_at_0.5"] == pytest.approx(f1_at_half[i], abs=1e-5)


def test_per_label_train_counts_are_the_given_ones(predictions):
    """Under the "validation" protocol the thresholds come from the validation images, while the
    per-label table reports the training counts passed in, not the threshold split's."""
    (train_targets, train_probs), (test_targets, test_probs) = predictions
    train_counts = np.arange(len(VOCABULARY)) * 7 + 3
    results = metrics.evaluation_results(train_targets, train_probs, test_targets, test_probs,
                                         VOCABULARY, train_counts=train_counts, resamples=100)
    assert [row["train_count"] for row in results["per_label"]] == train_counts.tolist()


def test_results_markdown_tables(results):
    config = base.get_config(model="resnet101", loss="focal")
    text = reports.results_markdown(results, config, num_train_images=80, epoch_seconds=12.4)
    assert "| **resnet101** | focal | avg | 32 | 80 | 448 * 448 | - | 12s |" in text
    config.model.head = "csra"  # no global pooling: the head reads the spatial map
    assert "| **resnet101** | focal | csra | 32 |" in reports.results_markdown(
        results, config, num_train_images=80, epoch_seconds=12.4)

    def row(name):
        match = re.search(r"^\| \*testset\* " + re.escape(name) + r" \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$",
                          text, flags=re.M)
        assert match, name
        return [float(x) for x in match.groups()]

    for name, key, kind in (("per-image metrics", "fixed_0.5", "per_image"),
                            ("per-class metrics + MCC", "mcc", "per_class")):
        expected = [results[key][f"{kind}_{m}"] for m in ("precision", "recall", "f1")]
        assert row(name) == pytest.approx(expected, abs=5e-4)
    assert f"| *testset* + MCC | {results['mcc']['n_plus']} |" in text
    assert "Protocol:" not in text  # results of metrics.evaluation_results alone name none
    low, high = results["ci95"]["mcc"]["per_class_f1"]
    assert f"| *testset* + MCC | {low:.3f} - {high:.3f} |" in text
    text = reports.results_markdown(dict(results, protocol="validation"), config,
                                    num_train_images=80, epoch_seconds=None)
    assert "Protocol: validation: the checkpoint and the MCC thresholds chosen on the held-out" in text
    label_rows = [line for line in text.splitlines() if line.startswith("| ") and line.count("|") == 9
                  and line.split("|")[1].strip() in VOCABULARY]
    counts = [int(line.split("|")[2]) for line in label_rows]
    assert len(label_rows) == len(VOCABULARY) and counts == sorted(counts, reverse=True)


def test_write_reports(tmp_path, predictions, results):
    _, (test_targets, test_probs) = predictions
    images = np.random.default_rng(1).integers(0, 256, (len(test_targets), 24, 24, 3), dtype=np.uint8)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "train/epoch_seconds": 30.0}) + "\n")
    config = base.get_config(model="xception", loss="lsep")
    config.model.dtype = "bfloat16"
    results = {**results, "best_epoch": 3}
    reports.write_reports(tmp_path, results, config, images, test_targets, test_probs, VOCABULARY, 80)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    stored = json.loads((tmp_path / "thresholds.json").read_text())
    assert stored == {"vocabulary": VOCABULARY, "thresholds": results["thresholds"], "epoch": 3,
                      "dtype": "bfloat16"}
    assert "| 30s |" in (tmp_path / "results.md").read_text()
    for name in (reports.PREDICTIONS_PICTURE, reports.F1_PICTURE):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and min(picture.size) > 200


def test_label_statuses_mark_correct_wrong_and_missed():
    statuses = reports.label_statuses(np.array([1, 0, 1, 0, 1]), np.array([1, 1, 0, 0, 1]),
                                      ["a", "b", "c", "d", "e"])
    assert statuses == [("a", "correct"), ("e", "correct"), ("b", "wrong"), ("c", "missed")]


def test_prediction_picture_shows_the_original_files_and_the_three_colours(tmp_path):
    rng = np.random.default_rng(2)
    files = []
    for i in range(3):  # original files of 300 x 200 px, not training-size arrays
        files.append(tmp_path / f"{i}.jpeg")
        Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)).save(files[-1])
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0]])
    probs = np.array([[0.9, 0.8, 0.1], [0.2, 0.9, 0.1], [0.1, 0.2, 0.3]])
    path = reports.plot_predictions(tmp_path / "picture.png", files, targets, probs,
                                    [0.5, 0.5, 0.5], ["sky", "tree", "water"], columns=3)
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB")).reshape(-1, 3).astype(int)
        assert picture.size[0] >= 3 * 300  # each image drawn at a readable width
    for colour in reports.LABEL_COLOURS.values():
        rgb = np.array([int(colour[k:k + 2], 16) for k in (1, 3, 5)])
        assert (np.abs(pixels - rgb).sum(axis=1) < 30).sum() > 20, colour


def test_prediction_picture_applies_the_per_label_thresholds(tmp_path, monkeypatch):
    seen = []
    real = reports.label_statuses
    monkeypatch.setattr(reports, "label_statuses",
                        lambda targets, predicted, vocabulary: seen.append(predicted.tolist())
                        or real(targets, predicted, vocabulary))
    images = [np.zeros((32, 32, 3), np.uint8)] * 2
    probs = np.array([[0.9, 0.6, 0.3], [0.96, 0.2, 0.35]])
    reports.plot_predictions(tmp_path / "picture.png", images, np.ones((2, 3), int), probs,
                             [0.95, 0.5, 0.25], ["sky", "tree", "water"], columns=2)
    assert seen == [[False, True, True], [True, False, True]]  # probs > each label's threshold


def test_prediction_picture_compares_in_the_probabilities_dtype(tmp_path, monkeypatch):
    """float32(0.55) is above the float64 0.55 but not above the threshold in float32, where
    metrics.evaluation_results compares: the picture must not call it predicted."""
    seen = []
    real = reports.label_statuses
    monkeypatch.setattr(reports, "label_statuses",
                        lambda targets, predicted, vocabulary: seen.append(predicted.tolist())
                        or real(targets, predicted, vocabulary))
    probs = np.array([[0.55, 0.9]], np.float32)
    thresholds = [0.55, 0.5]
    reports.plot_predictions(tmp_path / "picture.png", [np.zeros((32, 32, 3), np.uint8)],
                             np.ones((1, 2), int), probs, thresholds, ["sky", "tree"], columns=1)
    assert seen == [[False, True]]
    assert metrics.annotation_metrics(np.ones((1, 2)), probs, np.asarray(thresholds))["n_plus"] == 1


def test_a_picture_save_that_fails_midway_leaves_the_previous_picture(tmp_path, predictions,
                                                                      results, monkeypatch):
    """The pictures are written whole or not at all, as the JSON reports are: a save that dies
    after writing part of the file (a full disk, a kill) leaves the earlier picture and no
    temporary file."""
    import matplotlib.figure

    previous = b"the earlier run's picture"
    (tmp_path / reports.F1_PICTURE).write_bytes(previous)

    def torn_save(figure, file, **options):
        file.write(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn_save)
    with pytest.raises(OSError, match="No space left"):
        reports.plot_f1_vs_frequency(tmp_path / reports.F1_PICTURE, results["per_label"])
    assert (tmp_path / reports.F1_PICTURE).read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == [reports.F1_PICTURE]


def test_metric_cell_is_mean_and_sample_sd_or_the_one_value():
    """sd with n - 1 (by hand: [0.5, 0.6] -> 0.0707; [140, 150] -> 7.07); one run's N+ as a
    count."""
    assert reports.metric_cell([0.5, 0.6], "per_class_f1") == "0.550 ± 0.071"
    assert reports.metric_cell([140, 150], "n_plus") == "145.0 ± 7.1"
    assert reports.metric_cell([148], "n_plus") == "148"
    assert reports.metric_cell([1 / 3], "per_image_f1") == "0.333"
