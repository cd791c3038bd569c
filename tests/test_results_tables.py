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
    torch_eager = {"what": "throughput", "model": "tresnet_m", "mode": "bf16", "res": 448,
                   "img_per_s": 600.0}
    torch_compiled = dict(torch_eager, mode="bf16compile", img_per_s=750.0)
    _write(tmp_path / "a-jax-only.jsonl", [machine, ours])
    _write(tmp_path / "b-torch-only.jsonl", [machine, torch_compiled])
    _write(tmp_path / "c-both.jsonl", [machine, dict(ours, img_per_s=1200.0), torch_eager,
                                       torch_compiled])
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


def test_unknown_generated_block_is_an_error(results_tables):
    page = "<!-- BEGIN generated:nope -->\nold\n<!-- END generated:nope -->\n"
    with pytest.raises(KeyError, match="unknown generated table 'nope'"):
        results_tables.render(page)
