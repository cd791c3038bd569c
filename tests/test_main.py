"""annotate.main: the command line (flags, overrides, errors, --evaluate on a trained workdir)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from annotate import main

REPO = Path(__file__).resolve().parents[1]


def run_main(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "annotate.main", *args], cwd=REPO,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=600)


def test_default_workdir():
    assert main.default_workdir("configs/tresnet_asl.py") == Path("runs/tresnet_asl")
    assert main.default_workdir("/abs/configs/smoke.py") == Path("runs/smoke")


def test_missing_dataset_says_how_to_get_it(tmp_path):
    done = run_main("--config=configs/smoke.py", f"--workdir={tmp_path / 'run'}",
                    f"--config.data.root={tmp_path / 'nowhere'}")
    assert done.returncode != 0
    assert "annotate.data.fetch" in done.stderr and str(tmp_path / "nowhere") in done.stderr
    assert "Traceback" not in done.stderr  # the cause alone, not a stack trace


def test_unknown_model_override_lists_valid_models(tmp_path):
    done = run_main("--config=configs/smoke.py", f"--workdir={tmp_path / 'run'}",
                    "--config.model.name=vgg16")
    assert done.returncode != 0
    assert "unknown model 'vgg16'" in done.stderr and "tresnet_m" in done.stderr
    assert "Traceback" not in done.stderr


def test_run_keeps_its_compiled_steps_in_the_default_cache(smoke_workdir):
    """The smoke run (XDG_CACHE_HOME set, JAX_COMPILATION_CACHE_DIR not) wrote its train step into
    JAX's persistent compilation cache under $XDG_CACHE_HOME/annotate/jax."""
    cache = smoke_workdir.parent / "cache" / "annotate" / "jax"
    assert any(entry.name.startswith("jit_train_step") for entry in cache.iterdir()), (
        sorted(entry.name for entry in cache.iterdir()))


def test_evaluate_reproduces_results(smoke_workdir, corel5k_dir):
    workdir = smoke_workdir
    trained = json.loads((workdir / "results.json").read_text())
    (workdir / "results.json").unlink()
    done = run_main("--config=configs/smoke.py", f"--workdir={workdir}", "--evaluate",
                    env={"COREL5K_DIR": str(corel5k_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((workdir / "results.json").read_text()) == trained
    assert f"per-image F1 {trained['mcc']['per_image_f1']:.3f}" in done.stdout
