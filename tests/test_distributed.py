"""A multi-process run through `python -m annotate.main --config.distributed=True`: two CPU
processes of one device each, joined by a coordinator on 127.0.0.1, end with the parameters of
one process with two devices, write one set of files, and resume."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from annotate import training_log
from conftest import latest_checkpoint_arrays, write_dataset
from modules import REPO

TIMEOUT_S = 300  # every wait is bounded: a hung coordinator fails the test, not CI


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _command(workdir: Path, root: Path, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "annotate.main", "--config=configs/smoke.py",
            f"--workdir={workdir}", f"--config.data.root={root}",
            f"--config.data.cache_dir={root.parent / 'cache'}", "--config.data.image_size=16",
            "--config.train.batch_size=4", f"--config.train.epochs={epochs}",
            "--config.train.schedule_epochs=2", "--config.eval.bootstrap_resamples=100", *extra]


def _environment(devices: int) -> dict[str, str]:
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}


def _two_processes(workdir: Path, root: Path, epochs: int,
                   *extra: str) -> list[subprocess.CompletedProcess]:
    address = f"127.0.0.1:{_free_port()}"
    launched = [subprocess.Popen(
        _command(workdir, root, epochs, "--config.distributed=True",
                 f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
                 *extra),
        cwd=REPO, env=_environment(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    finished = []
    try:
        for process in launched:
            out, err = process.communicate(timeout=TIMEOUT_S)
            finished.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    finally:
        for process in launched:
            process.kill()
    return finished


def test_two_processes_train_as_one_process_with_two_devices_and_resume(tmp_path):
    root = write_dataset(tmp_path / "data")
    single = subprocess.run(_command(tmp_path / "single", root, 2), cwd=REPO,
                            env=_environment(2), capture_output=True, text=True,
                            timeout=TIMEOUT_S)
    assert single.returncode == 0, single.stderr[-3000:]

    workdir = tmp_path / "two"
    for epochs in (1, 2):  # one epoch, then the same command resumes for the second
        runs = _two_processes(workdir, root, epochs)
        for run in runs:
            assert run.returncode == 0, run.stderr[-3000:]
        assert "see " in runs[0].stdout and "see " not in runs[1].stdout  # process 0 reports

    (_, ours), (_, theirs) = (latest_checkpoint_arrays(workdir),
                              latest_checkpoint_arrays(tmp_path / "single"))
    assert ours.keys() == theirs.keys() and "params.head.fc.kernel" in ours
    for name, array in ours.items():
        np.testing.assert_allclose(array, theirs[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert [r["epoch"] for r in training_log.read_metrics(workdir)] == [1, 2]  # written once
    assert len(list((workdir / "tensorboard").glob("events.out.tfevents.*"))) == 2  # per start
    assert (workdir / "results.json").is_file() and not (workdir / ".lock").exists()


def test_a_corrupt_image_met_by_one_streaming_process_ends_both_at_once(tmp_path):
    """With the stream pipeline each process decodes only its own rows, so one process meets a
    corrupt training image alone, mid-epoch. It names the image and exits; the other, waiting in
    the step's collective, fails within seconds too and says so (before: both hung at
    jax.distributed's shutdown barrier for its 5 minutes, then aborted with status 134)."""
    root = write_dataset(tmp_path / "data")
    (root / "images" / "9.jpeg").write_bytes(b"not an image")
    runs = _two_processes(tmp_path / "run", root, 1, "--config.data.pipeline=stream")
    assert [run.returncode for run in runs] == [2, 2], [run.stderr[-2000:] for run in runs]
    last_lines = sorted(run.stderr.strip().splitlines()[-1] for run in runs)
    assert "9.jpeg: cannot decode image" in last_lines[0], last_lines
    assert "another process stopped (its error names the cause)" in last_lines[1], last_lines
    assert not any("is smaller than num_threads" in run.stderr for run in runs)  # grain's warning


def test_a_process_without_its_coordinator_ends_with_one_line_naming_it(tmp_path):
    """Process 1 started where no process 0 serves: one line and status 2 after
    --initialization_timeout (before: jax aborted the interpreter, status 134, after 300 s)."""
    address = f"127.0.0.1:{_free_port()}"
    run = subprocess.run(
        _command(tmp_path / "run", write_dataset(tmp_path / "data"), 1,
                 "--config.distributed=True", f"--coordinator_address={address}",
                 "--num_processes=2", "--process_id=1", "--initialization_timeout=2"),
        cwd=REPO, env=_environment(1), capture_output=True, text=True, timeout=TIMEOUT_S)
    assert run.returncode == 2, run.stderr[-2000:]
    assert run.stderr.strip().splitlines()[-1].startswith(
        f"error: --config.distributed=True: no coordinator answered at {address} within 2 s")
