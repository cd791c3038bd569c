"""scripts/results_tables.py: docs/results.md agrees with docs/measurements/, and a JAX/PyTorch
ratio is only formed from lines of one file (one device call)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from modules import load_module



@pytest.fixture(scope="module")
def results_tables():
    return load_module("scripts/results_tables.py")


def test_results_page_is_built_from_the_committed_files(results_tables):
    assert results_tables.main(["--check"]) == 0, "run python scripts/results_tables.py"


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))


def test_ratio_only_within_one_file(results_tables, tmp_path, monkeypatch):
    machine = {"what": "machine", "gpus": ["NVIDIA H200, 143771 MiB, 580"], "jax": "0.11.2",
               "torch": "2.11.0"}
    ours = {"what": "train_throughput", "model": "tresnet_m", "dtype": "bfloat16", "batch": 32,
            "res": 448, "steps_per_call": 1, "img_per_s": 1500.0, "step_ms": 21.3}
    torch_eager = {"what": "throughput", "model": "tresnet_m", "mode": "bf16", "batch": 32,
                   "res": 448, "img_per_s": 600.0}
    torch_compiled = dict(torch_eager, mode="bf16compile", img_per_s=750.0)
    _write(tmp_path / "a-jax-only.jsonl", [machine, ours])
    _write(tmp_path / "b-torch-only.jsonl", [machine, torch_compiled])
    _write(tmp_path / "c-both.jsonl", [machine, dict(ours, img_per_s=1200.0), torch_eager,
                                       torch_compiled])
    # float32 against torch's bf16, and a batch torch did not run: no ratio; a failed variant
    _write(tmp_path / "e-other-shapes.jsonl", [
        machine, dict(ours, dtype="float32", img_per_s=300.0), dict(ours, batch=64),
        {"what": "train_throughput", "model": "tresnet_m", "dtype": "bfloat16", "batch": 32,
         "res": 448, "steps_per_call": 10, "error": "XlaRuntimeError: RESOURCE_EXHAUSTED:\n oom"},
        torch_eager])
    _write(tmp_path / "d-flops.jsonl", [{"what": "train_flops", "model": "tresnet_m",
                                         "dtype": "bfloat16", "res": 448, "batch": 32,
                                         "train_flops_per_img": 1e11}])
    monkeypatch.setattr(results_tables, "MEASUREMENTS", tmp_path)
    rows = {line.split("`")[1]: line for line in results_tables.train_step_table().splitlines()
            if "`" in line}
    assert "| 150 | - | - | - | `a-jax-only" in rows["a-jax-only.jsonl"]  # no torch, no ratio
    assert "| 1.60x |" in rows["c-both.jsonl"]  # 1200 / 750, the better of the file's two
    assert "| 120 |" in rows["c-both.jsonl"]  # 1e11 FLOP x 1200 img/s = 120 TFLOP/s
    assert "NVIDIA H200, jax 0.11.2" in rows["b-torch-only.jsonl"]
    other = [line for line in results_tables.train_step_table().splitlines()
             if "e-other-shapes" in line]
    assert len(other) == 3
    assert "| 448 | 32 | float32 | 1 | 300 |" in other[0] and "| 600 | - | - |" in other[0]
    assert "| 10 | - | - |" in other[1] and \
        "| failed: XlaRuntimeError: RESOURCE_EXHAUSTED: oom |" in other[1]
    assert "| 448 | 64 | bfloat16 | 1 | 1,500 |" in other[2] and "| - | - | - |" in other[2]


def test_depthwise_variants_are_rows_of_their_own_against_one_torch_line(results_tables,
                                                                         tmp_path, monkeypatch):
    ours = {"what": "train_throughput", "model": "xception", "dtype": "bfloat16", "batch": 32,
            "res": 448, "steps_per_call": 1, "img_per_s": 1200.0, "step_ms": 26.7,
            "depthwise": "taps"}
    torch_compiled = {"what": "throughput", "model": "xception", "mode": "bf16compile",
                      "batch": 32, "res": 448, "img_per_s": 1000.0}
    _write(tmp_path / "a.jsonl", [ours, dict(ours, depthwise="grouped", img_per_s=600.0,
                                             step_ms=53.4),
                                  torch_compiled])
    monkeypatch.setattr(results_tables, "MEASUREMENTS", tmp_path)
    rows = [line for line in results_tables.train_step_table().splitlines() if "`a.jsonl`" in line]
    assert [row.split(" | ")[0] for row in rows] == ["| xception (depthwise taps)",
                                                     "| xception (depthwise grouped)"]
    assert "| 1.20x |" in rows[0] and "| 0.60x |" in rows[1]
    rows = [line for line in results_tables.depthwise_step_table().splitlines()
            if "`a.jsonl`" in line]
    assert "| 2.00x |" in rows[0] and "| 1.00x |" in rows[1]  # speed against grouped: 1200 / 600


def test_a_line_that_is_not_json_names_its_file_and_line(results_tables, tmp_path, monkeypatch):
    """A line cut short by a killed process is an error, not a measurement silently dropped."""
    (tmp_path / "a.jsonl").write_text('{"what": "machine"}\n\n{"what": "train_thro\n')
    monkeypatch.setattr(results_tables, "MEASUREMENTS", tmp_path)
    with pytest.raises(ValueError, match=r"a.jsonl:3 is not a JSON line"):
        results_tables.train_step_table()
    (tmp_path / "a.jsonl").write_text('{"what": "machine"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"a.jsonl:2 is a JSON list, not an object"):
        results_tables.train_step_table()


def test_epoch_medians_are_over_every_epoch_from_the_raw_lists(results_tables, tmp_path,
                                                               monkeypatch):
    """The median of each run's per-epoch seconds (np.median, as torch_reference.py takes its
    own; not the line's stored upper median): [34, 2, 4, 3] -> 3.5 s, 7.0 / 3.5 = 2.00x; every
    annotate_train line of a file is a row; a run from before the recorded protocol (the
    seed's) is the reference recipe, one under "validation" is not."""
    machine = {"what": "machine", "gpus": ["NVIDIA H200, 143771 MiB, 580"], "jax": "0.11.2",
               "torch": "2.11.0"}
    torch = {"what": "train_from_scratch", "epochs": 3, "epoch_s_median": 7.0}
    old = {"what": "annotate_train", "epochs_run": 4, "epoch_s_median": 4.0,
           "epoch_s": [34.0, 2.0, 4.0, 3.0]}
    csra = dict(old, head="csra", protocol="validation", epoch_s=[30.0, 1.0, 1.0, 1.0],
                between_epochs_s=[0.5, 0.7, 0.6], between_epochs_s_median=0.7)
    _write(tmp_path / "a-train.jsonl", [machine, torch, old, csra])
    monkeypatch.setattr(results_tables, "MEASUREMENTS", tmp_path)
    rows = results_tables.epoch_table().splitlines()[2:]
    assert rows[0].startswith("| 4 epochs | 3.50 | - | 3 epochs | 7.00 | 2.00x |"), rows
    assert rows[1].startswith("| 4 epochs, csra head | 1.00 | 0.60 | 3 epochs | 7.00 | 7.00x |")
    assert [path.name for path, _ in results_tables.train_runs(reference_only=True)] == \
        ["a-train.jsonl"]
    _write(tmp_path / "a-train.jsonl", [machine, torch, csra])
    assert results_tables.train_runs(reference_only=True) == []


def test_unknown_generated_block_is_an_error(results_tables):
    page = "<!-- BEGIN generated:nope -->\nold\n<!-- END generated:nope -->\n"
    with pytest.raises(KeyError, match="unknown generated table 'nope'"):
        results_tables.render(page)


def test_cpu_parity_rows_are_seeds_then_mean_and_sample_sd(results_tables, tmp_path, monkeypatch):
    """Per side (ours, the reference under autocast, the reference in float32) one row per seed,
    then mean ± sample sd: per-class F1 0.1, 0.2, 0.3 -> 0.200 ± 0.100; N+ 100, 110 -> 105.0 ± 7.1."""
    metrics = lambda f1, n_plus: {"per_class_f1": f1, "per_image_f1": 0.4,  # noqa: E731
                                  "n_plus": n_plus}
    ours = [{"what": "annotate_run", "seed": seed, "dtype": "float32",
             "fixed_0.5": metrics(f1, 100), "mcc": metrics(f1, 90)}
            for seed, f1 in ((1, 0.1), (2, 0.2), (3, 0.3))]
    theirs = [{"what": "train_from_scratch", "seed": seed, "test_at_0_5": metrics(0.2, n_plus),
               "test_mcc": metrics(0.2, n_plus)} for seed, n_plus in ((1, 100), (2, 110))]
    single = [{"what": "train_from_scratch", "seed": 1, "dtype": "float32",
               "test_at_0_5": metrics(0.25, 120), "test_mcc": metrics(0.25, 121)}]
    _write(tmp_path / "x-cpu-parity.jsonl", [{"what": "machine"}, *ours, *theirs, *single])
    monkeypatch.setattr(results_tables, "MEASUREMENTS", tmp_path)
    rows = {line.split(" | ")[0].strip("| *"): line.split(" | ")[1:]
            for line in results_tables.cpu_parity_table().splitlines()[2:]}
    assert rows["annotate (JAX, float32), mean ± sd of 3"][:3] == ["0.200 ± 0.100",
                                                                 "0.400 ± 0.000", "100.0 ± 0.0"]
    assert rows["PyTorch reference (bf16 autocast), mean ± sd of 2"][2] == "105.0 ± 7.1"
    assert rows["PyTorch reference (float32), seed 1"][:3] == ["0.250", "0.400", "120"]
    assert len(rows) == 3 + 1 + 2 + 1 + 1


def test_head_step_time_is_against_the_linear_head_of_the_same_file(results_tables, tmp_path,
                                                                    monkeypatch):
    """ML-Decoder at 30 ms against the same file's linear head at 24 ms: +25.0%; a file with no
    linear line of that shape gives no row; CPU lines stay out of the GPU train-step table."""
    step = {"what": "train_throughput", "model": "resnet18", "dtype": "float32", "batch": 32,
            "res": 40, "steps_per_call": 1, "platform": "cpu"}
    lines = [dict(step, head=head, step_ms=ms, img_per_s=32_000 / ms)
             for head, ms in (("linear", 24.0), ("ml_decoder", 30.0), ("csra", 24.6))]
    _write(tmp_path / "a-cpu-head-step.jsonl", [{"what": "machine", "jax": "0.10.2"}, *lines])
    _write(tmp_path / "b-no-linear.jsonl", [dict(lines[1], res=64)])
    monkeypatch.setattr(results_tables, "MEASUREMENTS", tmp_path)
    rows = {line.split(" | ")[1]: line for line in
            results_tables.head_step_table().splitlines()[2:]}
    assert set(rows) == {"linear", "ml_decoder", "csra"}
    assert "| +25.0% |" in rows["ml_decoder"] and "| +2.5% |" in rows["csra"]
    assert "| +0.0% |" in rows["linear"] and "| 1,333.3 |" in rows["linear"]
    assert len(results_tables.train_step_table().splitlines()) == 2  # the header only


def test_a_heads_run_is_labelled_and_kept_out_of_the_parity_tables(results_tables, tmp_path,
                                                                   monkeypatch):
    """What device_check.sh's heads and wgan sections and device_train.sh with another head and
    the validation protocol write lands in tables of its own, without manual edits."""
    machine = {"what": "machine", "gpus": ["NVIDIA H200, 143771 MiB, 580"], "jax": "0.11.2",
               "torch": "2.11.0"}
    step = {"what": "train_throughput", "model": "tresnet_m", "head": "linear",
            "dtype": "bfloat16", "batch": 32, "res": 224, "steps_per_call": 10,
            "img_per_s": 3600.0, "step_ms": 8.9}
    wgan = {"what": "wgan_throughput", "pairs": 32, "dtype": "float32", "width": 64,
            "s_per_iteration": 0.05, "images_per_hour": 2300.0, "hours_for_4500_images": 1.96,
            "speedup_vs_seed": 49.2}
    seed = {"what": "wgan_seed_sequential", "s_per_iteration": 0.06,  # the seed's loop, same call
            "s_per_image_1001_its": 60.06, "hours_for_4500_images": 75.1}
    metrics = {"per_class_f1": 0.3, "per_image_f1": 0.5, "n_plus": 140}
    train = {"what": "annotate_train", "head": "csra", "protocol": "validation",
             "epochs_run": 40, "epoch_s_median": 2.1}
    run = {"what": "annotate_run", "head": "csra", "image_size": 224, "epochs": 40,
           "protocol": "validation", "seed": 1, "fixed_0.5": metrics, "mcc": metrics}
    _write(tmp_path / "a-step.jsonl", [machine, step, dict(step, head="csra", step_ms=9.1),
                                       wgan, seed])
    _write(tmp_path / "b-train-csra.jsonl", [machine, train, run])  # no run folder beside it
    monkeypatch.setattr(results_tables, "MEASUREMENTS", tmp_path)
    assert "| tresnet_m + csra | 224 | 32 | bfloat16 | 10 |" in results_tables.train_step_table()
    # 2,300 images/h against the seed's 3600 / 60.06 s = 59.9 images/h: 38x
    assert ("| 32 | float32 | 64 | 0.0500 | 2,300 | 1.96 | 49 | 38 | - | `a-step.jsonl` |"
            in results_tables.wgan_throughput_table())
    assert "| csra | 224 | 40 | validation | 1 | 0.300 |" in results_tables.gpu_heads_table()
    assert "40 epochs, csra head" in results_tables.epoch_table()
    assert "b-train-csra" not in results_tables.parity_table() + results_tables.epochs_table()


def test_a_device_runs_lines_are_recorded_as_the_tables_read_them(results_tables, smoke_workdir,
                                                                 tmp_path, capsys):
    """device_train.sh's record of a run (here the smoke run's workdir): its annotate_train line
    holds every epoch's seconds and their median, the final and best epochs' test metrics and the
    MCC results, read back from metrics.jsonl and results.json; the summary sets them beside the
    reference's figures and the same call's PyTorch epoch, with the parity verdict."""
    import shutil

    import numpy as np

    workdir = Path(shutil.copytree(smoke_workdir, tmp_path / "run"))
    epochs = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    results = json.loads((workdir / "results.json").read_text())
    measurements = tmp_path / "measurements.jsonl"
    _write(measurements, [{"what": "machine", "gpus": ["CPU"]},
                          {"what": "train_from_scratch", "epochs": 3, "epoch_s_median": 6.0}])
    torn = measurements.read_text()
    measurements.write_text(torn + '{"what": "throughput", "mod\n')  # a killed reference's line
    overrides = "--config.model.head=linear --config.seed=0"  # as device_train.sh gives them
    assert results_tables.main(["--record-run", str(workdir), str(measurements),
                                f"--overrides={overrides}"]) == 0
    summary = capsys.readouterr().out
    machine, torch, _, line, run = [json.loads(text) if text.endswith("}") else None
                                    for text in measurements.read_text().splitlines()]
    seconds = [epoch["train/epoch_seconds"] for epoch in epochs]
    assert line["what"] == "annotate_train" and line["overrides"] == overrides
    assert line["epochs_run"] == len(epochs) == 2 and line["epoch_s"] == seconds
    assert line["epoch_s_median"] == pytest.approx(float(np.median(seconds)))
    assert line["final"]["per_class_f1"] == epochs[-1]["test/per_class_f1"]
    best = max(epochs, key=lambda epoch: epoch["test/per_class_f1"])["epoch"]
    assert line["best_epoch_by_test_f1"] == best and line["mcc"] == results["mcc"]
    assert run["what"] == "annotate_run" and run["mcc"] == results["mcc"]
    final = epochs[-1]
    assert (f"| final epoch 2, at 0.5 | {final['test/per_class_f1']:.3f} (0.333) | "
            f"{final['test/per_image_f1']:.3f} (0.494) | {final['test/n_plus']} (148) |") in summary
    assert f"{6.0 / line['epoch_s_median']:.2f}x the reference's speed" in summary
    assert summary.rstrip().endswith("N+ >= 138): MISSED")  # 2 epochs at 32 px
    # a run stopped by its timeout after epoch 1 (a torn last line): not decided
    (workdir / "metrics.jsonl").write_text(json.dumps(epochs[0]) + "\n" + '{"epoch": 2, "te')
    assert "NOT DECIDED: the run stopped after epoch 1 of 2" in results_tables.record_run(
        workdir, tmp_path / "other.jsonl", "")
