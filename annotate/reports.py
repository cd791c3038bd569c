"""Reports of an evaluation: results.json, results.md (the seed's tables), thresholds.json and two
pictures (test images with true vs predicted labels; per-label F1 against label frequency).

Everything here writes files from arrays (targets, probabilities, images) and the results of
`annotate.metrics.evaluation_results`; the model and the checkpoints are annotate.train's.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the non-interactive backend)
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from annotate import data, metrics, training_log  # noqa: E402
from annotate.workdir import write_atomically  # noqa: E402

PROTOCOL_TEXT = {
    "seed": "the seed's: the checkpoint chosen by test per-class F1, MCC thresholds chosen on the "
            "training images",
    "validation": "validation: the checkpoint and the MCC thresholds chosen on the held-out "
                  "validation images (validation_images.json); the test set scored once",
    "final": "final: the last epoch, MCC thresholds chosen on the training images (no selection)",
}
PREDICTIONS_PICTURE = "test_predictions.png"
F1_PICTURE = "per_label_f1_vs_frequency.png"


def seed_tables(fixed: Mapping[str, Any], mcc: Mapping[str, Any],
                cell: Callable[[Any, str], str]) -> list[str]:
    """The seed's P/R/F1 table (per-image and per-class metrics, at threshold 0.5 and with MCC
    thresholds) and its N+ table, as markdown lines. `fixed` and `mcc` map each metric name
    ("per_image_precision", ..., "n_plus") to what `cell(value, metric)` writes into its cell:
    one run's number in results.md, the mean ± sd over runs in annotate.summarize."""
    lines = ["| data | precision | recall | f1-score |", "| :---: | :---: | :---: | :---: |"]
    for name, values, kind in (("per-image metrics", fixed, "per_image"),
                               ("per-image metrics + MCC", mcc, "per_image"),
                               ("per-class metrics", fixed, "per_class"),
                               ("per-class metrics + MCC", mcc, "per_class")):
        cells = [cell(values[f"{kind}_{m}"], f"{kind}_{m}") for m in ("precision", "recall", "f1")]
        lines.append(f"| *testset* {name} | " + " | ".join(cells) + " |")
    return lines + ["", "| data | N+ |", "| :---: | :---: |",
                    f"| *testset* | {cell(fixed['n_plus'], 'n_plus')} |",
                    f"| *testset* + MCC | {cell(mcc['n_plus'], 'n_plus')} |"]


def metric_cell(values: Sequence[float], metric: str) -> str:
    """A table cell of `metric` over runs: mean ± sample sd, or one run's value alone; P/R/F1 to
    3 decimals, N+ to 1 (one run's, a count, to 0). The one format of results.md, annotate.
    summarize and docs/results.md."""
    column = np.asarray(values, dtype=np.float64)
    digits = (0 if len(column) == 1 else 1) if metric == "n_plus" else 3
    mean = f"{column.mean():.{digits}f}"
    return mean if len(column) == 1 else f"{mean} ± {column.std(ddof=1):.{digits}f}"


def step_label(record: Mapping[str, Any]) -> str:
    """A train-step measurement's backbone, with its head when not the seed's linear one and its
    depthwise convolutions' implementation when the line names one: 'xception (depthwise taps)',
    'tresnet_m + csra'."""
    head = record.get("head", "linear")
    label = record["model"] if head == "linear" else f"{record['model']} + {head}"
    return label + (f" (depthwise {record['depthwise']})" if record.get("depthwise") else "")


def results_markdown(results: dict, config: ml_collections.ConfigDict, *,
                     num_train_images: int, epoch_seconds: float | None) -> str:
    """results.md: the seed's run table, P/R/F1 table (per-image and per-class, without and with
    MCC thresholds), N+ table, then the per-label table (most frequent labels first)."""
    fixed, mcc = results["fixed_0.5"], results["mcc"]
    epoch_time = f"{epoch_seconds:.0f}s" if epoch_seconds is not None else "-"
    image_size = config.data.image_size
    # the linear head pools; ML-Decoder and CSRA read the spatial map themselves
    pooling = config.model.global_pool if config.model.head == "linear" else config.model.head
    lines = [
        f"# {config.model.name} + {config.loss.name}: Corel-5k test set",
        "",
        "| model | loss | global-pooling | batch-size | num of training images | image-size | "
        "best epoch | epoch time |",
        "| :---: | :---: | :---: | :---: | :---: | :---: | :---: | :---: |",
        f"| **{config.model.name}** | {config.loss.name} | {pooling} | "
        f"{config.train.batch_size} | {num_train_images} | {image_size} * {image_size} | "
        f"{results.get('best_epoch', '-')} | {epoch_time} |",
        "",
        *seed_tables(fixed, mcc, lambda value, metric: metric_cell([value], metric)),
    ]
    if "protocol" in results:
        lines += ["", f"Protocol: {PROTOCOL_TEXT[results['protocol']]}."]
    if "ci95" in results:
        lines += ["", "95% bootstrap intervals over the test images (value ± 1.96 bootstrap sd):",
                  "",
                  "| data | per-class F1 | per-image F1 | N+ |", "| :---: | :---: | :---: | :---: |"]
        for name, key in (("*testset*", "fixed_0.5"), ("*testset* + MCC", "mcc")):
            interval = results["ci95"][key]
            cells = [f"{interval[m][0]:.3f} - {interval[m][1]:.3f}"
                     for m in ("per_class_f1", "per_image_f1")]
            cells.append(f"{interval['n_plus'][0]:.0f} - {interval['n_plus'][1]:.0f}")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## Per label (MCC thresholds; F1 at 0.5 for comparison)", "",
              "| label | train images | test images | threshold | precision | recall | f1 | f1 at 0.5 |",
              "| :--- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in sorted(results["per_label"], key=lambda r: (-r["train_count"], r["label"])):
        lines.append(f"| {row['label']} | {row['train_count']} | {row['test_count']} | "
                     f"{row['threshold']:.2f} | {row['precision']:.3f} | {row['recall']:.3f} | "
                     f"{row['f1']:.3f} | {row['f1_at_0.5']:.3f} |")
    return "\n".join(lines) + "\n"


LABEL_COLOURS = {"correct": "#1a9641", "wrong": "#d7191c", "missed": "#8c8c8c"}
LABEL_MARKS = {"correct": "+", "wrong": "x", "missed": "o"}
OVERFLOW_COLOUR = "#404040"


def label_statuses(true_row: np.ndarray, predicted_row: np.ndarray,
                   vocabulary: Sequence[str]) -> list[tuple[str, str]]:
    """(label, status) for one image: "correct" (predicted and true), "wrong" (predicted, not
    true), then "missed" (true, not predicted), each in vocabulary order."""
    true_row, predicted_row = np.asarray(true_row) > 0, np.asarray(predicted_row) > 0
    order = (("correct", true_row & predicted_row), ("wrong", ~true_row & predicted_row),
             ("missed", true_row & ~predicted_row))
    return [(vocabulary[j], status) for status, mask in order for j in np.flatnonzero(mask)]


def _picture(image: np.ndarray | Path, size: int) -> np.ndarray:
    """An image (an array, or a file read at its own resolution) fitted into size x size."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            opened = data.as_rgb(opened)
            opened.thumbnail((size, size))
            return np.asarray(opened)
    return np.asarray(image)


def plot_predictions(path: Path | str, images: Sequence[np.ndarray | Path], targets: np.ndarray,
                     probs: np.ndarray, thresholds: Sequence[float], vocabulary: Sequence[str],
                     *, count: int = 16, columns: int = 4, size: int = 384,
                     max_labels: int = 12) -> Path:
    """The seed's `predicted_batch_plot`, readable: the first `count` test images (the original
    files where given, fitted into `size` px) with their labels below, one per line:
    predicted and true in green (+), predicted but not true in red (x), true but missed in grey
    (o), under the per-label thresholds; past `max_labels` lines, the rest are counted."""
    count = min(count, len(images))
    rows = -(-count // columns)
    probs = np.asarray(probs)
    predicted = metrics.above_thresholds(probs[:count], thresholds)
    statuses = [label_statuses(targets[i], predicted[i], vocabulary) for i in range(count)]
    for i, image_statuses in enumerate(statuses):  # at most max_labels lines per image
        if len(image_statuses) > max_labels:
            rest = image_statuses[max_labels - 1:]
            counts = ", ".join(f"{sum(s == kind for _, s in rest)} {kind}" for kind in LABEL_MARKS
                               if any(s == kind for _, s in rest))
            statuses[i] = image_statuses[:max_labels - 1] + [(f"... {counts}", "more")]
    lines = max((len(s) for s in statuses), default=1)
    line_points = 15  # one label per line, 12 pt type
    text_inches = (lines + 1) * line_points / 72
    figure = plt.figure(figsize=(4 * columns, rows * (4 + text_inches) + 0.4))
    grid = figure.add_gridspec(rows, columns, height_ratios=[1] * rows, hspace=0,
                               top=1 - 0.4 / figure.get_figheight(), bottom=0.0)
    for i in range(count):
        cell = grid[i // columns, i % columns].subgridspec(
            2, 1, height_ratios=[4, text_inches], hspace=0)
        axis = figure.add_subplot(cell[0])
        axis.axis("off")
        axis.imshow(_picture(images[i], size))
        axis.set_anchor("S")  # the image sits on its labels
        text = figure.add_subplot(cell[1])
        text.axis("off")
        for line, (label, status) in enumerate(statuses[i]):
            mark = f"{LABEL_MARKS[status]} " if status in LABEL_MARKS else ""
            text.annotate(f"{mark}{label}", xy=(0.02, 1.0), xycoords="axes fraction",
                          xytext=(0, -line_points * (line + 1)), textcoords="offset points",
                          color=LABEL_COLOURS.get(status, OVERFLOW_COLOUR), fontsize=12,
                          fontweight="bold")
    figure.legend(handles=[matplotlib.patches.Patch(color=colour, label=status)
                           for status, colour in LABEL_COLOURS.items()],
                  loc="upper center", ncol=3, fontsize=12)
    _save_atomically(figure, Path(path), dpi=80)
    return Path(path)


def _save_atomically(figure: matplotlib.figure.Figure, path: Path, dpi: int) -> None:
    """Save and close `figure` at `path` whole or not at all (a run killed mid-save leaves the
    previous picture), in the format its suffix names."""
    try:
        write_atomically(path, lambda file: figure.savefig(
            file, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(figure)


def plot_f1_vs_frequency(path: Path | str, per_label: Sequence[dict]) -> Path:
    """Per-label test F1 (MCC thresholds) against the label's number of training images."""
    counts = np.array([row["train_count"] for row in per_label])
    f1 = np.array([row["f1"] for row in per_label])
    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.scatter(np.maximum(counts, 1), f1, s=12, alpha=0.7)
    axis.set_xscale("log")
    axis.set_xlabel("training images with the label (log scale)")
    axis.set_ylabel("test F1 (MCC thresholds)")
    axis.set_ylim(-0.02, 1.02)
    axis.set_title(f"per-label F1 vs label frequency ({len(per_label)} labels)")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    _save_atomically(figure, Path(path), dpi=100)
    return Path(path)


def write_reports(workdir: Path | str, results: dict, config: ml_collections.ConfigDict,
                  test_images: Sequence[np.ndarray | Path], test_targets: np.ndarray,
                  test_probs: np.ndarray, vocabulary: Sequence[str],
                  num_train_images: int) -> None:
    """Write results.json, results.md, thresholds.json (vocabulary, thresholds, the epoch of the
    checkpoint they were chosen for and the compute dtype of the probabilities they were chosen
    on, read by annotate.predict) and the two pictures into `workdir`."""
    workdir = Path(workdir)  # the files annotate.predict and summarize read are whole or absent
    write_atomically(workdir / "results.json", json.dumps(results, indent=2) + "\n")
    write_atomically(workdir / "thresholds.json", json.dumps(
        {"vocabulary": list(vocabulary), "thresholds": results["thresholds"],
         "epoch": results.get("best_epoch"), "dtype": config.model.dtype}, indent=2) + "\n")
    seconds = [r["train/epoch_seconds"] for r in training_log.read_metrics(workdir)
               if "train/epoch_seconds" in r]
    epoch_seconds = float(np.median(seconds)) if seconds else None
    write_atomically(workdir / "results.md", results_markdown(
        results, config, num_train_images=num_train_images, epoch_seconds=epoch_seconds))
    plot_predictions(workdir / PREDICTIONS_PICTURE, test_images, test_targets, test_probs,
                     results["thresholds"], vocabulary)
    plot_f1_vs_frequency(workdir / F1_PICTURE, results["per_label"])
