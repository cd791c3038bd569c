"""scripts/benchmark.py at the tiniest sizes on the CPU: the train-step record's fields, its FLOP
count against torch's flop counter on the same timm model, the WGAN record and the report table."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
TRAIN_ARGS = ["train", "--models", "resnet18", "--dtypes", "float32", "--res", "32", "--batch",
              "2", "--warmup", "1", "--steps", "2", "--repeats", "2", "--batches-on-device", "2"]


@pytest.fixture(scope="module")
def benchmark():
    """The script as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmark"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_record(benchmark) -> dict:
    """The one timed record of a tiny ResNet-18 train-step benchmark (compiled once per module)."""
    records = benchmark.main(TRAIN_ARGS)
    assert len(records) == 1 and "error" not in records[0], records
    return records[0]


def test_train_record_is_sane(train_record, capsys):
    record = train_record
    assert (record["model"], record["dtype"], record["batch"], record["res"]) == (
        "resnet18", "float32", 2, 32)
    assert record["img_per_s"] > 0 and record["step_ms"] > 0
    # images/s and ms/step are two views of the same median
    assert record["img_per_s"] == pytest.approx(2 * 1000.0 / record["step_ms"], rel=1e-9)
    low, high = record["spread"]
    assert 0 < low <= 1.0 <= high
    assert record["compile_s"] > 0 and record["lower_s"] > 0
    start, end = record["compile_window_s"]
    assert end - start == pytest.approx(record["compile_s"])
    assert record["achieved_tflop_per_s"] == pytest.approx(
        record["train_flops_per_img"] * record["img_per_s"] / 1e12, rel=1e-9)
    # the donated state aliases its output: the memory analysis sees the ~11.8M f32 parameters
    # (params + two Adam moments, ~142 MB) among the arguments
    assert record["argument_bytes"] > 3 * 11_000_000 * 4
    assert record["temp_bytes"] >= 0


def test_train_flops_match_torch_flop_counter(train_record):
    """XLA's count for the whole step (forward, backward, Adam) vs torch's count of the same timm
    ResNet-18's convolutions and matmuls in forward + backward: equal up to elementwise work and
    XLA's rewrites (measured here: 0.93), so within a factor of 1.5 either way."""
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model("resnet18", pretrained=False, num_classes=260)
    images = torch.randn(2, 3, 32, 32)
    counter = FlopCounterMode(display=False)
    with counter:
        model(images).sum().backward()
    torch_per_image = counter.get_total_flops() / 2
    ratio = train_record["train_flops_per_img"] / torch_per_image
    assert 1 / 1.5 < ratio < 1.5, (train_record["train_flops_per_img"], torch_per_image)


def test_wgan_record_extrapolates_against_the_seed(benchmark, monkeypatch):
    """The WGAN command's plumbing with a stand-in measurement (the real one compiles for minutes
    on a CPU): speed-up = images/hour over the seed's 3600 / (0.077 s x 1001)."""
    import wgan.train

    measured = {"pairs": 8, "iterations": 3, "compile_s": 1.0, "s_per_iteration": 0.5,
                "images_per_hour": 8 * 3600 / (0.5 * 1001),
                "hours_for_4500_images": 4500 / (8 * 3600 / (0.5 * 1001))}
    monkeypatch.setattr(wgan.train, "wgan_throughput", lambda *args, **kwargs: dict(measured))
    monkeypatch.setattr(benchmark, "precompile_wgan",
                        lambda variants, iterations, width: {v: 2.0 for v in variants})
    (record,) = benchmark.main(["wgan", "--pairs", "8", "--dtypes", "float32", "--width", "4"])
    assert record["speedup_vs_seed"] == pytest.approx(0.077 / 0.5 * 8)
    assert record["precompile_s"] == 2.0 and record["dtype"] == "float32"


def test_report_divides_by_the_torch_line_of_the_same_model(benchmark, train_record, tmp_path,
                                                           capsys):
    ours = dict(train_record, dtype="bfloat16")
    torch_lines = [{"what": "throughput", "model": "resnet18", "mode": "bf16", "img_per_s": 1.0},
                   {"what": "throughput", "model": "resnet18", "mode": "bf16compile",
                    "img_per_s": 2.0},
                   {"what": "throughput", "model": "tresnet_m", "mode": "bf16", "img_per_s": 3.0}]
    wgan_line = {"what": "wgan_throughput", "pairs": 64, "dtype": "float32",
                 "s_per_iteration": 0.2, "images_per_hour": 1151.0,
                 "hours_for_4500_images": 3.91, "speedup_vs_seed": 24.6}
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(["log line, not JSON", json.dumps(ours), "{broken"]
                              + [json.dumps(line) for line in torch_lines + [wgan_line]]) + "\n")
    records = benchmark.main(["report", str(path)])
    assert len(records) == 5
    table = capsys.readouterr().out
    resnet_row = next(line for line in table.splitlines() if line.startswith("| resnet18 "))
    assert f"{ours['img_per_s'] / 2.0:.2f}x (vs compile)" in resnet_row  # compiled torch preferred
    tresnet_row = next(line for line in table.splitlines() if line.startswith("| tresnet_m "))
    assert "| 3.00 |" in tresnet_row and "x" not in tresnet_row  # torch only: no ratio
    assert "| 64 | float32 | 0.2000 | 1,151 | 3.91 | 25x |" in table
