"""annotate.main: the command line (flags, overrides, errors, --evaluate on a trained workdir)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    JAX's persistent compilation cache under $XDG_CACHE_HOME/annotate/jax, and the short
    compilations too (the initialisers' key seeding, well under JAX's default 1 s threshold)."""
    cache = smoke_workdir.parent / "cache" / "annotate" / "jax"
    names = sorted(entry.name for entry in cache.iterdir())
    for kept in ("jit_train_step", "jit__threefry_seed"):
        assert any(name.startswith(kept) for name in names), names


def test_evaluate_reproduces_results(smoke_workdir, corel5k_dir, tmp_path):
    workdir = Path(shutil.copytree(smoke_workdir, tmp_path / "run"))  # the run is shared
    trained = json.loads((workdir / "results.json").read_text())
    (workdir / "results.json").unlink()
    done = run_main("--config=configs/smoke.py", f"--workdir={workdir}", "--evaluate",
                    env={"COREL5K_DIR": str(corel5k_dir),  # the run's compiled steps, reused
                         "XDG_CACHE_HOME": str(smoke_workdir.parent / "cache")})
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((workdir / "results.json").read_text()) == trained
    assert f"per-image F1 {trained['mcc']['per_image_f1']:.3f}" in done.stdout


def test_distributed_without_a_cluster_or_coordinator_is_one_line(tmp_path):
    """--config.distributed=True where jax detects no cluster, or with a process index out of
    range: one line naming the flags to give, before any data is read."""
    from conftest import write_dataset

    root = write_dataset(tmp_path / "tiny")
    common = ("--config=configs/smoke.py", f"--workdir={tmp_path / 'run'}",
              f"--config.data.root={root}", "--config.distributed=True")
    for extra in ([], ["--coordinator_address=localhost:12399", "--num_processes=2",
                       "--process_id=5"]):
        done = run_main(*common, *extra)
        assert done.returncode == 2, done.stderr[-3000:]
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith("error: --config.distributed=True: ") and \
            "--coordinator_address=HOST:PORT" in last, done.stderr[-3000:]
        assert "Traceback" not in done.stderr


def test_reports_that_cannot_be_written_are_one_line_and_keep_the_checkpoints(tmp_path):
    """A report that cannot be written (a full disk; here a folder in a picture's place) after
    the training: one line naming the workdir and the way out, the checkpoint kept."""
    from conftest import write_dataset

    root = write_dataset(tmp_path / "tiny")
    workdir = tmp_path / "run"
    (workdir / "test_predictions.png").mkdir(parents=True)
    done = run_main("--config=configs/smoke.py", f"--workdir={workdir}",
                    f"--config.data.root={root}", "--config.train.epochs=1",
                    "--config.train.batch_size=4", "--config.eval.bootstrap_resamples=100",
                    env={"ANNOTATE_CACHE": str(tmp_path / "cache")})
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: writing the reports into {workdir} failed (") and \
        "--evaluate" in last, done.stderr[-3000:]
    assert (workdir / "checkpoints" / "1").is_dir() and (workdir / "results.json").is_file()


@pytest.mark.parametrize("allocation,message", [
    ("jnp.zeros(2 ** 38).block_until_ready()", "error: out of device memory (RESOURCE_EXHAUSTED: "
                                               "Out of memory "),
    ("np.empty(2 ** 38)", "error: out of host memory (MemoryError: Unable to allocate "),
])
def test_out_of_memory_is_one_line_naming_what_uses_less(tmp_path, allocation, message):
    """XLA's RESOURCE_EXHAUSTED or numpy's MemoryError during a run (here real ones: a 1 TiB
    buffer in a process capped at 1 TiB of address space) end it with one line naming what uses
    less memory (what the config does not already use) and how to keep the checkpoints."""
    from conftest import ADDRESS_SPACE_CAP, write_dataset

    root = write_dataset(tmp_path / "tiny")
    script = (ADDRESS_SPACE_CAP + "import jax.numpy as jnp, numpy as np\n"
              "from annotate import cli, main, train\n"
              f"train.train_and_evaluate = lambda *args: {allocation}\n"
              "cli.run(main.main, main.define_flags)\n")
    done = subprocess.run([sys.executable, "-c", script, "--config=configs/smoke.py",
                           f"--workdir={tmp_path / 'run'}", f"--config.data.root={root}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(message), last
    if "device" in message:
        assert last.endswith(
            "use less with a smaller --config.train.eval_batch_size, --config.model.dtype=bfloat16, "
            "--config.data.pipeline=stream (the dataset off the device), and a rerun resumes from "
            "the last checkpoint; or with a smaller --config.train.batch_size, in a new --workdir "
            "once this one holds checkpoints"), last
    else:
        assert last.endswith("checkpoints already written are kept: free memory or lower what "
                             "the message names, then rerun (with --evaluate if the training "
                             "finished)"), last


def test_out_of_device_memory_advice_leaves_out_what_the_run_already_uses():
    """A bfloat16 run on the stream pipeline (as device_train.sh's reference config computes in
    bfloat16) is not told to switch to them."""
    import jax
    from configs import base

    config = base.get_config(model="resnet18", loss="asl")
    config.model.dtype, config.data.pipeline = "bfloat16", "stream"
    error = jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes.\n"
                                       "details")
    assert main.out_of_device_memory(error, config) == (
        "out of device memory (RESOURCE_EXHAUSTED: Out of memory allocating 8 bytes.); use less "
        "with a smaller --config.train.eval_batch_size, and a rerun resumes from the last "
        "checkpoint; or with a smaller --config.train.batch_size, in a new --workdir once this "
        "one holds checkpoints")
