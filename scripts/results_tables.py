"""Rebuild the tables of docs/results.md from the raw device measurements in docs/measurements/.

Every table between `<!-- BEGIN generated:NAME -->` and `<!-- END generated:NAME -->` in
docs/results.md is written by this script from the JSON-line files (as `scripts/benchmark.py`,
`torch_reference.py` and `scripts/device_train.sh` printed them), so each number on the page
traces to a file. A JAX/PyTorch ratio is only formed from lines of the same file (one device call).

    python scripts/results_tables.py           # rewrite the generated tables in place
    python scripts/results_tables.py --check   # exit 1 if docs/results.md is out of date

It also writes the lines of a device_train.sh run (the writer beside the reader of its format):

    python scripts/results_tables.py --record-run WORKDIR MEASUREMENTS --overrides="$OVERRIDES"
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from annotate.reports import metric_cell, step_label

REPO = Path(__file__).resolve().parents[1]
MEASUREMENTS = REPO / "docs" / "measurements"
RESULTS_PAGE = REPO / "docs" / "results.md"
# The PyTorch reference's full 40-epoch run (one H100, 2026-11-26), quoted from issue #6: the
# one set of figures on the page without a raw file in docs/measurements/.
REFERENCE_40_EPOCHS = {"at 0.5": {"per_class_f1": 0.333, "per_image_f1": 0.494, "n_plus": 148},
                       "MCC thresholds": {"per_class_f1": 0.327, "per_image_f1": 0.528,
                                          "n_plus": 133}}
PARITY_TARGET = {"per_class_f1": 0.313, "n_plus": 138}  # final epoch, threshold 0.5
REFERENCE_EPOCH_S = 6.2  # its median 224 px epoch, eager (issue #6)
BLOCK = re.compile(r"(<!-- BEGIN generated:(?P<name>[\w-]+) -->\n).*?(<!-- END generated:(?P=name) -->)",
                   re.DOTALL)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSON-lines file; ValueError naming the file and line of one that
    is not (a line cut short by a killed process would otherwise drop its measurement)."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number} is not a JSON line ({error})") from error
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number} is a JSON {type(record).__name__}, not an object")
        records.append(record)
    return records


def card(records: Iterable[dict[str, Any]]) -> str:
    """'NVIDIA H200, jax 0.11.2, torch 2.11.0+cu130' from a file's machine line."""
    for record in records:
        if record.get("what") == "machine":
            gpus = record.get("gpus")
            name = gpus[0].split(",")[0] if isinstance(gpus, list) and gpus else "CPU"
            return f"{name}, jax {record.get('jax')}, torch {record.get('torch')}"
    return "card not recorded"


def number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table(header: list[str], rows: list[list[str]], align: str = "") -> str:
    """A markdown table; `align` has one letter per column (l or r), right by default."""
    align = align or "l" + "r" * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |",
             "| " + " | ".join("---" if a == "l" else "---:" for a in align) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def flops_records() -> list[dict[str, Any]]:
    """benchmark.py flops lines: parameters and FLOPs per image of a train step (lowered HLO)."""
    return [record for path in sorted(MEASUREMENTS.glob("*.jsonl")) for record in read_lines(path)
            if record.get("what") == "train_flops"]


def lowered_flops() -> dict[tuple[str, str, str, int, int, str | None], tuple[float, str]]:
    """FLOPs per image of the train step and the name of the file that counted them, by
    (model, head, dtype, size, batch, depthwise implementation where the line names one)."""
    return {(r["model"], r.get("head", "linear"), r["dtype"], r["res"], r["batch"],
             r.get("depthwise")): (r["train_flops_per_img"], path.name)
            for path, r in _runs("*.jsonl") if r.get("what") == "train_flops"}


def timed_steps(records: Iterable[dict[str, Any]], *, gpu_only: bool = False,
                failed: bool = False) -> list[dict[str, Any]]:
    """The train_throughput lines that carry a time (optionally only those not from a CPU);
    with `failed`, also those of a variant that could not be built, compiled or timed."""
    return [r for r in records if r.get("what") == "train_throughput"
            and (r.get("img_per_s") or (failed and r.get("error")))
            and not (gpu_only and r.get("platform") == "cpu")]


def step_files() -> list[tuple[Path, list[dict[str, Any]]]]:
    """Files with train-step throughput lines (ours or PyTorch's), oldest first."""
    files = []
    for path in sorted(MEASUREMENTS.glob("*.jsonl")):
        records = read_lines(path)
        if any(r.get("what") in ("train_throughput", "throughput") for r in records):
            files.append((path, records))
    return files


def train_step_table() -> str:
    """JAX train step per backbone, size, dtype, batch and steps per call, beside PyTorch's
    bf16 and bf16 + torch.compile steps of the same shape from the same file; a ratio only
    between steps of one dtype. A variant that failed is a row that says so."""
    flops = lowered_flops()
    rows = []
    for path, records in step_files():
        torch = {(r["model"], r["res"], r["batch"], r["mode"]): r for r in records
                 if r.get("what") == "throughput" and r.get("img_per_s")}
        ours = timed_steps(records, gpu_only=True, failed=True)  # CPU steps: a table of their own
        shapes = list(dict.fromkeys([(r["model"], r["res"], r["batch"]) for r in ours]
                                    + [(m, res, batch) for m, res, batch, _ in torch]))
        for model, res, batch in shapes:
            torch_bf16 = torch.get((model, res, batch, "bf16"), {}).get("img_per_s")
            torch_compiled = torch.get((model, res, batch, "bf16compile"), {}).get("img_per_s")
            best_torch = max(filter(None, (torch_bf16, torch_compiled)), default=None)
            variants = [r for r in ours if (r["model"], r["res"], r["batch"]) == (model, res, batch)]
            for record in variants or [{}]:
                rate = record.get("img_per_s")
                head = record.get("head", "linear")
                per_image, flops_file = flops.get((model, head, record.get("dtype"), res, batch,
                                                   record.get("depthwise")), (None, None))
                same_dtype = record.get("dtype") == "bfloat16"  # torch's modes above are bf16
                ratio = (f"{rate / best_torch:.2f}x" if rate and best_torch and same_dtype
                         else "-")
                if record.get("error"):
                    ratio = f"failed: {' '.join(str(record['error']).split())[:80]}"
                rows.append([
                    step_label(dict(record, model=model)), str(res), str(batch),
                    record.get("dtype", "-"), str(record.get("steps_per_call", "-")),
                    number(rate), number(record.get("step_ms"), 2),
                    number(per_image / 1e9 if per_image else None, 1),
                    number(per_image * rate / 1e12 if per_image and rate else None),
                    number(torch_bf16), number(torch_compiled), ratio,
                    f"`{path.name}`" + (f", FLOPs `{flops_file}`" if flops_file else ""),
                    card(records)])
    return table(["backbone", "px", "batch", "JAX dtype", "K", "JAX img/s", "JAX ms/step",
                  "GFLOP/img", "TFLOP/s", "torch bf16", "torch bf16+compile",
                  "JAX / best torch (same dtype)", "files", "card"], rows, "lrrlrrrrrrrlll")


def profile_table() -> str:
    """Per profiled variant: wall and GPU-busy time per step and the top kernel families."""
    rows = []
    for path, records in step_files():
        for record in records:
            if record.get("what") != "train_profile" or "device_threads" not in record:
                continue
            steps = record.get("steps_per_call", 1)
            gpu = {name: thread for name, thread in record["device_threads"].items()
                   if "GPU" in name and thread["busy_ms_per_call"] > 0.01}
            busiest = max(gpu.values(), key=lambda t: t["busy_ms_per_call"], default=None)
            if busiest is None:
                continue
            families = ", ".join(f"{re.sub(r'_kernel.*|_warpgroup.*', '', name)[:40]} "
                                 f"{ms / steps:.2f}" for name, ms in busiest["top_families"][:4])
            rows.append([step_label(record), str(record["res"]), str(steps),
                         f"{record['wall_ms_per_call'] / steps:.2f}",
                         f"{busiest['busy_ms_per_call'] / steps:.2f}", families,
                         f"`{path.name}`"])
    return table(["backbone", "px", "K", "wall ms/step (traced)", "GPU busy ms/step",
                  "top kernel families, ms/step", "file"], rows, "lrrrrll")


def _reference_recipe(record: dict[str, Any]) -> bool:
    """An annotate_train line of the reference recipe as issue #6 compares it: the linear head
    trained on the whole training split, under protocol "final" or "seed" (which differ only in
    the checkpoint and thresholds evaluated at the end; "validation" holds 500 images out).
    Lines written before device_train.sh recorded them were the seed protocol's runs."""
    return (record.get("head", "linear") == "linear"
            and record.get("protocol", "seed") in ("seed", "final"))


def _median(record: dict[str, Any], key: str) -> float | None:
    """The median of a run's per-epoch seconds `key` (over every epoch, as torch_reference.py
    takes its own), from the line's raw list where it holds one, else its `<key>_median`."""
    values = record.get(key)
    return float(np.median(values)) if values else record.get(f"{key}_median")


def train_runs(reference_only: bool = False) -> list[tuple[Path, list[dict[str, Any]]]]:
    """Files of full training runs (device_train.sh's measurements), oldest first; with
    `reference_only`, those of the reference recipe alone (the parity comparison)."""
    return [(path, records) for path in sorted(MEASUREMENTS.glob("*.jsonl"))
            for records in [read_lines(path)]
            if any(r.get("what") == "annotate_train"
                   and (_reference_recipe(r) or not reference_only) for r in records)]


def epoch_table() -> str:
    """Median training time of one 224 px epoch: ours against the PyTorch reference's in the
    same call; and our median time between epochs (evaluation, record, checkpoint save), which
    device_train.sh records from metrics.jsonl since 2026-11-29."""
    rows = []
    for path, records in train_runs():
        torch = next((r for r in records if r.get("what") == "train_from_scratch"), None)
        torch_s = torch["epoch_s_median"] if torch else None
        for ours in (r for r in records if r.get("what") == "annotate_train"):
            head = ours.get("head", "linear")
            epoch_s = _median(ours, "epoch_s")
            rows.append([f"{ours['epochs_run']} epochs" + ("" if head == "linear"
                                                           else f", {head} head"),
                         f"{epoch_s:.2f}", number(_median(ours, "between_epochs_s"), 2),
                         f"{torch['epochs']} epochs" if torch else "-", number(torch_s, 2),
                         f"{torch_s / epoch_s:.2f}x" if torch_s else "-",
                         f"`{path.name}`", card(records)])
    return table(["ours (annotate.main)", "median s/epoch", "median s between epochs",
                  "PyTorch reference (eager)", "median s/epoch", "speed-up", "file", "card"],
                 rows, "lrrlrrll")


def metric_cells(metrics: dict[str, Any]) -> list[str]:
    """One run's per-class F1, per-image F1 and N+ cells."""
    return [metric_cell([metrics[metric]], metric)
            for metric in ("per_class_f1", "per_image_f1", "n_plus")]


def parity_met(final_epoch: dict[str, Any]) -> bool:
    """Whether a run's final-epoch test metrics at 0.5 (metrics.jsonl's "test/..." keys) reach
    PARITY_TARGET."""
    return (final_epoch["test/per_class_f1"] >= PARITY_TARGET["per_class_f1"]
            and final_epoch["test/n_plus"] >= PARITY_TARGET["n_plus"])


def _scored(record: dict[str, Any], prefix: str) -> dict[str, Any]:
    """A metrics.jsonl record's metrics of one split ("test/per_class_f1" -> "per_class_f1")."""
    return {key[len(prefix) + 1:]: value for key, value in record.items()
            if key.startswith(prefix + "/")}


def record_run(workdir: Path, measurements: Path, overrides: str) -> str:
    """Append a device_train.sh run's `annotate_train` line (its epochs' seconds, final and best
    epoch, MCC results) and, when it was evaluated, annotate.summarize's `annotate_run` line to
    the call's `measurements` file; return the run's summary beside the PyTorch reference's
    figures, the same call's reference epoch and the parity target (markdown)."""
    from annotate import summarize
    from annotate.training_log import read_metrics

    records = read_metrics(workdir)  # a run killed by its timeout: the torn last line dropped
    if not records:
        raise ValueError(f"no epochs recorded in {workdir}/metrics.jsonl")
    # the split scored after every epoch: "test", or "val" under --config.eval.protocol=validation
    prefix = "test" if "test/per_class_f1" in records[-1] else "val"
    final = records[-1]
    best = max(records, key=lambda record: record[f"{prefix}/per_class_f1"])
    config = json.loads((workdir / "config.json").read_text())
    results_path = workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    epoch_seconds = [record["train/epoch_seconds"] for record in records]
    between_seconds = [record["train/seconds_between_epochs"] for record in records
                       if "train/seconds_between_epochs" in record]
    line = {"what": "annotate_train", "config": "configs/reference_tresnet_asl_224.py",
            "overrides": overrides, "head": config["model"].get("head", "linear"),
            "protocol": config["eval"]["protocol"], "monitored": prefix,
            "epochs_run": len(records), "epoch_s": epoch_seconds,
            "between_epochs_s": between_seconds, "final": _scored(final, prefix),
            f"best_epoch_by_{prefix}_f1": best["epoch"], "mcc": results.get("mcc")}
    epoch_s, between_s = _median(line, "epoch_s"), _median(line, "between_epochs_s")
    line.update(epoch_s_median=epoch_s, between_epochs_s_median=between_s)
    same_call = []  # the PyTorch reference's epoch in this call, read leniently: a line torn by
    for text in (measurements.read_text().splitlines() if measurements.is_file() else []):
        try:  # the reference's timeout must not lose this run's record
            record = json.loads(text)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("what") == "train_from_scratch":
            same_call.append(record)
    with measurements.open("a") as handle:
        handle.write(json.dumps(line) + "\n")
        if results:  # the run's test metrics as annotate.summarize --runs-jsonl writes them
            handle.write(json.dumps(summarize.run_record(summarize.read_run(workdir))) + "\n")

    reference = REFERENCE_40_EPOCHS

    def row(name: str, metrics: dict[str, Any], against: dict[str, Any]) -> list[str]:
        return [name, *(f"{ours} ({theirs})" for ours, theirs in
                        zip(metric_cells(metrics), metric_cells(against)))]

    rows = [row(f"final epoch {final['epoch']}, at 0.5", _scored(final, prefix),
                reference["at 0.5"]),
            row(f"best epoch {best['epoch']} by per-class F1, at 0.5", _scored(best, prefix),
                reference["at 0.5"])]
    if results:
        checkpoint = f"test set, checkpoint of epoch {results.get('best_epoch')}"
        rows += [row(f"{checkpoint}, at 0.5", results["fixed_0.5"], reference["at 0.5"]),
                 row(f"{checkpoint}, MCC thresholds", results["mcc"],
                     reference["MCC thresholds"])]
    lines = [table([f"{prefix} set, ours (reference)", "per-class F1", "per-image F1", "N+"],
                   rows, "lrrr")]
    if same_call:
        torch_s = same_call[-1]["epoch_s_median"]
        lines.append(f"PyTorch reference in this call: median epoch {torch_s:.2f} s over "
                     f"{same_call[-1]['epochs']} epochs; ours {epoch_s:.2f} s: "
                     f"{torch_s / epoch_s:.2f}x the reference's speed (target 2x)")
    lines.append(f"median epoch: {epoch_s:.2f} s (H100 reference of 2026-11-26: "
                 f"{REFERENCE_EPOCH_S} s), "
                 + (f"{between_s:.2f} s between epochs, " if between_s is not None else "")
                 + f"{final['train/images_per_second']:.0f} images/s in the final epoch; "
                 f"{len(records)} epochs, final train loss {final['train/loss']:.4f}")
    planned = config["train"]["epochs"]
    if prefix != "test":
        verdict = "not applicable: the epochs were scored on the validation images"
    elif final["epoch"] != planned:
        verdict = f"NOT DECIDED: the run stopped after epoch {final['epoch']} of {planned}"
    else:
        verdict = "MET" if parity_met(final) else "MISSED"
    lines.append(f"parity target (final epoch, at 0.5: per-class F1 >= "
                 f"{PARITY_TARGET['per_class_f1']}, N+ >= {PARITY_TARGET['n_plus']}): {verdict}")
    return "\n\n".join(lines)


CHOSEN_BY = {"seed": " (chosen by test per-class F1, the seed's protocol)",
             "final": " (the last, protocol final)"}


def parity_table() -> str:
    """Test metrics of each full run: final and best epoch at 0.5, best checkpoint with MCC
    thresholds, beside the reference's 40-epoch figures (issue #6) and the target."""
    rows = []
    for path, records in train_runs(reference_only=True):
        (ours,) = [r for r in records if r.get("what") == "annotate_train"]  # its folder's run
        folder = path.with_suffix("")
        epochs = read_lines(folder / "metrics.jsonl")
        final, best = epochs[-1], max(epochs, key=lambda r: r["test/per_class_f1"])
        results = json.loads((folder / "results.json").read_text())
        met = parity_met(final)
        source = f"`{folder.name}/`"
        rows += [[f"ours, final epoch {final['epoch']}, at 0.5", *metric_cells(_scored(final, "test")),
                  "met" if met else "missed", source],
                 [f"ours, best epoch {best['epoch']} by test per-class F1, at 0.5",
                  *metric_cells(_scored(best, "test")), "", source],
                 [f"ours, checkpoint of epoch {results['best_epoch']}"
                  + CHOSEN_BY[ours.get("protocol", "seed")] + ", MCC thresholds",
                  *metric_cells(results["mcc"]), "", source]]
        assert ours["epochs_run"] == len(epochs), f"{path.name} and {folder} disagree"
    for name, metrics in REFERENCE_40_EPOCHS.items():
        rows.append([f"PyTorch reference, 40 epochs, {name}", *metric_cells(metrics), "",
                     "issue #6 (H100, 2026-11-26)"])
    rows.append(["target, final epoch at 0.5", f">= {PARITY_TARGET['per_class_f1']}", "",
                 f">= {PARITY_TARGET['n_plus']}", "", ""])
    return table(["test set (499 images)", "per-class F1", "per-image F1", "N+", "target",
                  "file"], rows, "lrrrll")


def epochs_table() -> str:
    """Every fifth epoch of each full run (from its metrics.jsonl), test metrics at 0.5."""
    rows = []
    for path, _ in train_runs(reference_only=True):
        for record in read_lines(path.with_suffix("") / "metrics.jsonl"):
            if record["epoch"] in (1, 2) or record["epoch"] % 5 == 0:
                rows.append([str(record["epoch"]), f"{record['train/loss']:.5f}",
                             f"{record['train/learning_rate']:.1e}",
                             f"{record['train/epoch_seconds']:.2f}",
                             f"{record['test/per_class_f1']:.3f}",
                             f"{record['test/per_image_f1']:.3f}", str(record["test/n_plus"])])
    return table(["epoch", "train loss", "lr", "s (train)", "per-class F1", "per-image F1",
                  "N+"], rows)


def head_cost_table() -> str:
    """Each head's trainable parameters and train-step FLOPs per image against the linear head
    on the same backbone and size."""
    records = [record for record in flops_records() if "params" in record]
    linear = {(r["model"], r["res"]): r for r in records if r.get("head", "linear") == "linear"}
    with_heads = {(r["model"], r["res"]) for r in records if r.get("head", "linear") != "linear"}
    rows = []
    for record in records:
        base = linear.get((record["model"], record["res"]))
        if base is None or (record["model"], record["res"]) not in with_heads:
            continue
        rows.append([record["model"], record.get("head", "linear"), str(record["res"]),
                     f"{record['params']:,}", f"{record['params'] - base['params']:+,}",
                     f"{record['train_flops_per_img'] / 1e9:.1f}",
                     f"{record['train_flops_per_img'] / base['train_flops_per_img'] - 1:+.1%}"])
    return table(["backbone", "head", "px", "trainable parameters", "vs linear",
                  "train GFLOP/img", "vs linear"], rows, "llrrrrr")


# Dense float32 and TF32 matrix rates of an H100/H200 SXM (datasheet leads, the same for both).
FP32_FLOPS, TF32_FLOPS = 67e12, 495e12


def _step_shape(record: dict[str, Any]) -> tuple[str, int, str, int, int, str | None]:
    """What a train step's time depends on besides the head."""
    return (record["model"], record["res"], record["dtype"], record["batch"],
            record["steps_per_call"], record.get("depthwise"))


def head_step_table() -> str:
    """Each head's train-step time against the linear head timed in the same file (same
    machine, backbone, size, dtype and steps per call)."""
    rows = []
    for path, records in step_files():
        timed = timed_steps(records)
        linear = {_step_shape(r): r for r in timed if r.get("head", "linear") == "linear"}
        with_other_heads = {_step_shape(r) for r in timed if r.get("head", "linear") != "linear"}
        for record in timed:
            base = linear.get(_step_shape(record))
            if base is None or _step_shape(record) not in with_other_heads:
                continue
            rows.append([step_label(dict(record, head="linear")), record.get("head", "linear"),
                         str(record["res"]), record["dtype"], str(record["steps_per_call"]),
                         number(record["step_ms"], 1), number(record["img_per_s"], 1),
                         f"{record['step_ms'] / base['step_ms'] - 1:+.1%}",
                         f"`{path.name}`", card(records)])
    return table(["backbone", "head", "px", "dtype", "K", "ms/step", "img/s",
                  "step time vs linear", "file", "machine"], rows, "llrlrrrrll")


def depthwise_step_table() -> str:
    """Each implementation of the depthwise convolutions against the grouped convolution timed in
    the same file (same machine, backbone, head, size, dtype, batch and steps per call)."""
    rows = []
    for path, records in step_files():
        timed = [r for r in timed_steps(records) if r.get("depthwise")]
        grouped = {(_step_shape(r)[:-1], r.get("head", "linear")): r for r in timed
                   if r["depthwise"] == "grouped"}
        for record in timed:
            base = grouped.get((_step_shape(record)[:-1], record.get("head", "linear")))
            rows.append([step_label(record), str(record["res"]), str(record["batch"]),
                         record["dtype"], str(record["steps_per_call"]),
                         number(record["step_ms"], 1), number(record["img_per_s"], 1),
                         f"{base['step_ms'] / record['step_ms']:.2f}x" if base else "-",
                         number(record["temp_bytes"] / 1e6 if record.get("temp_bytes") else None),
                         f"`{path.name}`", card(records)])
    return table(["backbone", "px", "batch", "dtype", "K", "ms/step", "img/s",
                  "speed vs grouped", "temp MB", "file", "machine"], rows, "lrrlrrrrrll")


def wgan_bound_table() -> str:
    """The ML-WGAN recipe's weight reads (counted on the traced step, beside the fewest), the
    bytes and FLOPs of one pair-iteration, and what they take for 4,500 images x 1,001
    iterations at each card's bandwidth and at float32 / TF32 matrix rates."""
    rows = []
    for path in sorted(MEASUREMENTS.glob("*.jsonl")):
        for record in read_lines(path):
            if record.get("what") != "wgan_bound":
                continue
            total = 4500 * 1001 * record["flops_per_pair_iteration"]
            fewest = record["fewest"]
            rows.append([
                f"{record['critic_reads_per_critic_step']:g} ({fewest['critic_reads_per_critic_step']})",
                f"{record['critic_reads_per_iteration']} ({fewest['critic_reads_per_iteration']})",
                f"{record['generator_reads_per_iteration']} "
                f"({fewest['generator_reads_per_iteration']})",
                f"{record['bytes_per_pair_iteration'] / 1e9:.3f}",
                f"{record['flops_per_pair_iteration'] / 1e9:.0f}",
                *(f"{record['bound_minutes_4500_images'][card_name]:.1f}"
                  for card_name in ("H100", "H200")),
                f"{total / FP32_FLOPS / 3600:.1f}", f"{total / TF32_FLOPS / 60:.0f}",
                f"`{path.name}`"])
    return table(["critic reads per critic step (fewest)", "critic reads per iteration (fewest)",
                  "generator reads per iteration (fewest)", "GB per pair-iteration",
                  "GFLOP per pair-iteration", "bound min, H100", "bound min, H200",
                  "float32 compute h", "TF32 compute min", "file"], rows, "rrrrrrrrrl")


def wgan_throughput_table() -> str:
    """benchmark.py wgan lines: per K pairs and compute dtype, seconds per iteration and images
    per hour of the 1,001-iteration recipe, extrapolated from the timed iterations; the speed-up
    over the seed's loop as timed on the H100 (77 ms per iteration), and over the seed's loop
    timed in the same file (torch_reference.py wgan), where it was."""
    rows = []
    for path in sorted(MEASUREMENTS.glob("*.jsonl")):
        records = read_lines(path)
        seed = next((r for r in records if r.get("what") == "wgan_seed_sequential"), None)
        for record in records:
            if record.get("what") != "wgan_throughput" or not record.get("images_per_hour"):
                continue
            peak = record.get("device_peak_bytes")
            rows.append([str(record["pairs"]), record.get("dtype", "-"), str(record.get("width")),
                         f"{record['s_per_iteration']:.4f}", number(record["images_per_hour"]),
                         f"{record['hours_for_4500_images']:.2f}",
                         number(record.get("speedup_vs_seed")),
                         number(record["images_per_hour"] * seed["s_per_image_1001_its"] / 3600
                                if seed else None),
                         number(peak / 1e9 if peak else None, 1), f"`{path.name}`",
                         card(records)])
    return table(["K pairs", "compute dtype", "width", "s per iteration", "images / hour",
                  "hours for 4,500 images", "vs seed (77 ms/iteration)", "vs seed, same call",
                  "peak GPU GB", "file", "card"], rows, "rlrrrrrrrll")


def stream_table() -> str:
    """Images/s of the "stream" pipeline's decoding on the CPU beside the fastest JAX train step
    measured at the same size (bf16, any GPU): the share of the step's demand it covers."""
    steps: dict[int, tuple[float, str]] = {}
    for path, records in step_files():
        for record in timed_steps(records, gpu_only=True):
            if record["img_per_s"] > steps.get(record["res"], (0.0, ""))[0]:
                steps[record["res"]] = (record["img_per_s"], path.name)
    rows = []
    for path in sorted(MEASUREMENTS.glob("*.jsonl")):
        for record in read_lines(path):
            if record.get("what") != "stream_throughput":
                continue
            step, step_file = steps.get(record["res"], (None, ""))
            rows.append([str(record["res"]), str(record["threads"]), str(record["cpu_count"]),
                         number(record["img_per_s"]), number(step),
                         f"{record['img_per_s'] / step:.0%}" if step else "-",
                         f"`{path.name}`" + (f", `{step_file}`" if step_file else "")])
    return table(["px", "decode threads", "CPU cores", "stream img/s", "fastest train step img/s",
                  "stream / step", "files"], rows, "rrrrrrl")


def checkpoint_table() -> str:
    """benchmark.py checkpoint lines: per machine, backbone, format (packed: the loop's, one
    array per dtype; leaves: an orbax array per leaf, as before) and compression, the
    TrainState's and the checkpoint's size and the seconds (wall and CPU) of one save."""
    rows = []
    for path in sorted(MEASUREMENTS.glob("*.jsonl")):
        records = read_lines(path)
        for record in records:
            if record.get("what") != "checkpoint_save":
                continue
            rows.append([record["model"], record["format"], record["compression"],
                         number(record["state_mb"]), str(record["arrays"]),
                         str(record["arrays_saved"]),
                         number(record["disk_mb"]), number(record["save_blocking_s"], 2),
                         number(record["save_s"], 2), number(record["save_cpu_s"], 2),
                         str(record["cpu_count"]), f"`{path.name}`", card(records)])
    return table(["backbone", "format", "compression", "state MB", "state arrays",
                  "arrays saved", "on disk MB", "s blocking the loop", "s per save (whole)",
                  "CPU s per save", "CPU cores", "file", "machine"], rows, "lllrrrrrrrrll")


COMPARED = (("fixed_0.5", "per_class_f1"), ("fixed_0.5", "per_image_f1"), ("fixed_0.5", "n_plus"),
            ("mcc", "per_class_f1"), ("mcc", "per_image_f1"), ("mcc", "n_plus"))
COMPARED_HEADER = ["per-class F1 @0.5", "per-image F1 @0.5", "N+ @0.5", "per-class F1 MCC",
                   "per-image F1 MCC", "N+ MCC"]


def _metric_cells(values: list[dict[str, dict[str, float]]]) -> list[str]:
    """mean ± sd over runs (sample sd) of each COMPARED metric; one run: its value."""
    return [metric_cell([v[kind][metric] for v in values], metric) for kind, metric in COMPARED]


def _runs(pattern: str) -> list[tuple[Path, dict[str, Any]]]:
    return [(path, record) for path in sorted(MEASUREMENTS.glob(pattern))
            for record in read_lines(path)]


def cpu_parity_table() -> str:
    """Ours (annotate_run lines) against the PyTorch reference (train_from_scratch lines; under
    its bf16 autocast unless the line says "dtype": "float32"), each evaluated on its final
    model, per seed and as mean ± sd over seeds."""
    sides: dict[str, list[tuple[int, dict[str, Any], Path]]] = {}
    for path, record in _runs("*cpu-parity*.jsonl"):
        if record.get("what") == "annotate_run":
            side = f"annotate (JAX, {record.get('dtype', 'float32')})"
            values = {k: record[k] for k in ("fixed_0.5", "mcc")}
        elif record.get("what") == "train_from_scratch":
            dtype = record.get("dtype", "bf16 autocast")
            side = f"PyTorch reference ({dtype})"
            values = {"fixed_0.5": record["test_at_0_5"], "mcc": record["test_mcc"]}
        else:
            continue
        sides.setdefault(side, []).append((record["seed"], values, path))
    rows = []
    for side, runs in sorted(sides.items(), key=lambda item: not item[0].startswith("annotate")):
        for seed, values, path in sorted(runs, key=lambda run: run[0]):
            rows.append([f"{side}, seed {seed}", *_metric_cells([values]), f"`{path.name}`"])
        if len(runs) > 1:
            rows.append([f"**{side}, mean ± sd of {len(runs)}**",
                         *_metric_cells([values for _, values, _ in runs]), ""])
    return table(["run", *COMPARED_HEADER, "file"], rows, "lrrrrrrl")


def _head_rows(runs: list[tuple[Path, dict[str, Any]]], key: Sequence[str]) -> list[list[str]]:
    """One row per group of annotate_run lines with equal `key` fields (the head first): those
    fields, the seeds, mean ± sd over the runs and their files; the linear head first."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    files: dict[tuple, dict[str, None]] = {}  # per group, its files in order (an ordered set)
    for path, record in runs:
        if record.get("what") == "annotate_run":
            group = tuple(record[field] for field in key)
            groups.setdefault(group, []).append(record)
            files.setdefault(group, {})[f"`{path.name}`"] = None
    return [[*map(str, group),
             ", ".join(str(r["seed"]) for r in sorted(group_runs, key=lambda r: r["seed"])),
             *_metric_cells(group_runs), ", ".join(files[group])]
            for group, group_runs in sorted(groups.items(),
                                            key=lambda item: (item[0][1:], item[0][0] != "linear"))]


def gpu_heads_table() -> str:
    """Each head's runs on a GPU (annotate_run lines that device_train.sh writes, in files whose
    machine line names a GPU) as mean ± sd over seeds, per head, size, epochs and protocol."""
    runs = _runs("*.jsonl")
    on_gpu = {path for path, record in runs if record.get("what") == "machine"
              and isinstance(record.get("gpus"), list) and record["gpus"]}
    rows = _head_rows([(path, record) for path, record in runs if path in on_gpu],
                      ("head", "image_size", "epochs", "protocol"))
    return table(["head", "px", "epochs", "protocol", "seeds", *COMPARED_HEADER, "file"], rows,
                 "lrrllrrrrrrl")


def cpu_heads_table() -> str:
    """Each head's runs (annotate_run lines of a heads comparison) as mean ± sd over seeds,
    per head, size, epochs and protocol."""
    rows = _head_rows(_runs("*cpu-heads*.jsonl"), ("head", "image_size", "epochs", "protocol"))
    return table(["head", "px", "epochs", "protocol", "seeds", *COMPARED_HEADER, "file"], rows,
                 "lrrllrrrrrrl")


TABLES: dict[str, Callable[[], str]] = {
    "train-step": train_step_table, "profile": profile_table, "epoch": epoch_table,
    "parity": parity_table, "epochs": epochs_table, "head-cost": head_cost_table,
    "head-step": head_step_table, "depthwise-step": depthwise_step_table,
    "wgan-bound": wgan_bound_table, "wgan-throughput": wgan_throughput_table,
    "stream": stream_table, "checkpoint": checkpoint_table, "cpu-parity": cpu_parity_table,
    "cpu-heads": cpu_heads_table,
    "gpu-heads": gpu_heads_table}


def render(page: str) -> str:
    """`page` with every generated block rebuilt; an unknown block name is an error."""
    def replace(match: re.Match) -> str:
        name = match.group("name")
        if name not in TABLES:
            raise KeyError(f"docs/results.md names an unknown generated table {name!r}; "
                           f"known: {', '.join(TABLES)}")
        return match.group(1) + TABLES[name]() + "\n" + match.group(3)

    return BLOCK.sub(replace, page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 when docs/results.md differs from what the files give")
    parser.add_argument("--record-run", nargs=2, metavar=("WORKDIR", "MEASUREMENTS"),
                        help="append a device_train.sh run's lines to MEASUREMENTS and print "
                             "its summary")
    parser.add_argument("--overrides", default="",
                        help="the run's command-line overrides, recorded with --record-run "
                             "(give it as --overrides='--config...')")
    args = parser.parse_args(argv)
    if args.record_run:
        workdir, measurements = args.record_run
        print(record_run(Path(workdir), Path(measurements), args.overrides))
        return 0
    page = RESULTS_PAGE.read_text()
    rendered = render(page)
    if args.check:
        if rendered != page:
            print("docs/results.md is out of date: run python scripts/results_tables.py",
                  file=sys.stderr)
            return 1
        return 0
    RESULTS_PAGE.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
