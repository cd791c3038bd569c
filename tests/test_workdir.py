"""annotate.workdir and how the loop uses it: one run per workdir, config.json written only when
training starts and never by an evaluation, refusals that name the keys, a failed checkpoint save
stopping the run at once, and a torn metrics.jsonl line dropped on resume."""
from __future__ import annotations

import fcntl
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time

import jax
import jax.numpy as jnp
import pytest

from annotate import data, models, train, training_log
from annotate.config import resolved_config
from annotate.workdir import (FRESH_SECONDS, CheckpointSaveError, WorkdirError, WorkdirLock,
                              check_config, is_abandoned, state_layout, write_atomically,
                              write_config)
from conftest import lock_held_by_another_run, tiny_config


def test_a_second_run_is_refused_and_a_dead_runs_lock_taken_over(tmp_path, caplog):
    with lock_held_by_another_run(tmp_path):
        holder = json.loads((tmp_path / ".lock").read_text())
        assert (holder["pid"], holder["host"]) == (os.getpid(), socket.gethostname())
        with pytest.raises(WorkdirError, match=f"in use by process {os.getpid()} on "):
            with WorkdirLock(tmp_path):
                pass
    assert not (tmp_path / ".lock").exists()  # released

    dead = {"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "started": "yesterday"}
    (tmp_path / ".lock").write_text(json.dumps(dead))
    with WorkdirLock(tmp_path):  # taken over, with a warning
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert "no longer running" in caplog.text

    (tmp_path / ".lock").write_text(json.dumps(dict(dead, host="another-machine")))
    with pytest.raises(WorkdirError, match="on another-machine since yesterday.*delete"):
        with WorkdirLock(tmp_path):
            pass


def test_a_lock_is_live_by_its_flock_not_by_its_pid(tmp_path, caplog):
    """A container restarted after a kill runs the same command as the same pid (often 1): the
    lock naming that pid is the killed run's, not a live one's."""
    left = {"pid": os.getpid(), "host": socket.gethostname(), "started": "before the restart"}
    (tmp_path / ".lock").write_text(json.dumps(left))
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["started"] != left["started"]
    assert "no longer running" in caplog.text
    assert not (tmp_path / ".lock").exists()
    # a live run in another pid namespace: its pid means nothing here, its flock does
    (tmp_path / ".lock").write_text(json.dumps(dict(left, pid=2 ** 22 + 12345)))
    with open(tmp_path / ".lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(WorkdirError, match="in use by process"):
            with WorkdirLock(tmp_path):
                pass


def test_runs_taking_over_a_dead_runs_lock_at_once_never_both_hold_it(tmp_path):
    """Six threads (each opening the lock file as its own run would) take the lock over and over,
    and after each release leave a dead run's lock behind for the others to take over: at no
    time do two hold it (taking over by deleting and creating the file again let up to 4 in)."""
    dead = json.dumps({"pid": 2 ** 22 + 12345, "host": socket.gethostname(), "started": "then"})
    holders, most, taken = [0], [0], [0]
    guard = threading.Lock()

    def run_again_and_again() -> None:
        for _ in range(100):
            try:
                with WorkdirLock(tmp_path):
                    with guard:
                        holders[0] += 1
                        most[0], taken[0] = max(most[0], holders[0]), taken[0] + 1
                    time.sleep(0.0005)
                    with guard:
                        holders[0] -= 1
            except WorkdirError:  # refused: another holds it, or is writing its record
                pass
            try:
                descriptor = os.open(tmp_path / ".lock", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.write(descriptor, dead.encode())
            os.close(descriptor)

    runs = [threading.Thread(target=run_again_and_again) for _ in range(6)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert most[0] == 1 and taken[0] > 6


def test_a_thread_that_holds_the_lock_may_take_it_again_and_the_outer_block_releases_it(
        tmp_path):
    """The app holds the lock around train_and_evaluate, which takes it too, and keeps it through
    the reports: the nested block ends without releasing it."""
    with WorkdirLock(tmp_path):
        with WorkdirLock(tmp_path.parent / tmp_path.name / "." / ""):  # the same folder
            started = (tmp_path / ".lock").read_text()
        assert (tmp_path / ".lock").read_text() == started  # still held, by the outer block
        refused = []
        other = threading.Thread(target=lambda: refused.append(pytest.raises(
            WorkdirError, WorkdirLock(tmp_path).__enter__)))
        other.start()
        other.join()
        assert refused and "in use by process" in str(refused[0].value)
    assert not (tmp_path / ".lock").exists()  # released by the outer block
    with lock_held_by_another_run(tmp_path):
        pass


def test_busy_workdir_is_refused_before_any_work(tiny_dataset, tiny_backbone, tmp_path):
    config = tiny_config(tiny_dataset, tmp_path / "cache")
    with lock_held_by_another_run(tmp_path / "run"):
        with pytest.raises(WorkdirError, match="in use by process"):
            train.train_and_evaluate(config, tmp_path / "run")
        assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]


def test_config_json_only_when_training_starts_and_refusals_name_the_keys(
        tiny_dataset, tiny_backbone, tmp_path):
    workdir = tmp_path / "run"
    config = tiny_config(tiny_dataset, tmp_path / "cache")
    broken = tiny_config(tmp_path / "nowhere", tmp_path / "cache")
    with pytest.raises(data.DatasetError, match="no Corel-5k dataset at"):  # nothing recorded
        train.train_and_evaluate(broken, workdir)
    assert not (workdir / "config.json").exists()

    train.train_and_evaluate(config, workdir)
    saved = (workdir / "config.json").read_text()
    results = (workdir / "checkpoints").stat().st_mtime_ns
    bigger = tiny_config(tiny_dataset, tmp_path / "cache")
    bigger.data.image_size = 32
    for run in (train.train_and_evaluate, train.evaluate):
        with pytest.raises(WorkdirError, match="trained with data.image_size=16, not "
                                               "data.image_size=32; use another --workdir"):
            run(bigger, workdir)
    other_lr = tiny_config(tmp_path / "nowhere", tmp_path / "cache")
    other_lr.train.learning_rate = 0.5
    # a failing rerun leaves the finished run's config alone
    with pytest.raises(data.DatasetError, match="no Corel-5k dataset at"):
        train.train_and_evaluate(other_lr, workdir)
    assert (workdir / "config.json").read_text() == saved
    assert (workdir / "checkpoints").stat().st_mtime_ns == results
    check_config(workdir, resolved_config(config))  # the same config passes (as train resolves it)


@pytest.mark.parametrize("protocol, key, value, refused", [
    ("seed", "train.batch_size", 64, "resume"), ("seed", "train.schedule_epochs", 9, "resume"),
    ("seed", "data.augmentation", True, "both"), ("seed", "eval.protocol", "final", "both"),
    ("seed", "model.global_pool", "max", "both"), ("seed", "data.mean", (0.5, 0.5, 0.5), "both"),
    ("seed", "seed", 1, "neither"), ("seed", "eval.validation_size", 7, "neither"),
    ("validation", "seed", 1, "both"), ("validation", "eval.validation_size", 7, "both"),
    ("seed", "model.ml_decoder.dropout", 0.0, "neither"),
    ("seed", "model.drop_rate", 0.0, "neither"),
    ("seed", "model.ml_decoder.num_heads", 4, "both")])
def test_a_resume_or_evaluation_keeps_what_its_checkpoints_and_images_depend_on(
        tiny_dataset, tmp_path, protocol, key, value, refused):
    """A resumed run with another batch size or schedule length would follow a OneCycle of
    another length from a step count of the old one; another protocol, augmentation or held-out
    set would mix held-out images into training or choose thresholds on trained-on images, and
    another normalisation or pooling would evaluate another network: those are refused for an
    evaluation too (which would write results.json and thresholds.json from them); a head's
    dropout, like the linear head's drop_rate, is a training setting a resume may change (its
    config is kept, write_config); the seed matters only to which images a "validation" run holds
    out."""
    config = tiny_config(tiny_dataset, tmp_path)
    config.eval.protocol = protocol
    if key.startswith("model.ml_decoder"):
        config.model.head = "ml_decoder"
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(workdir, config)
    *parents, name = key.split(".")
    node = config
    for parent in parents:
        node = node[parent]
    saved_value = node[name]
    node[name] = value
    message = re.escape(f"trained with {key}={saved_value!r}, not {key}={value!r}").replace(
        r"\(", r"[\(\[]").replace(r"\)", r"[\)\]]")  # a tuple is saved as a JSON list
    for training, refused_here in ((True, refused != "neither"), (False, refused == "both")):
        if refused_here:
            with pytest.raises(WorkdirError, match=message):
                check_config(workdir, config, training=training)
        else:
            check_config(workdir, config, training=training)


def test_a_constant_learning_rate_run_may_be_given_more_epochs(tiny_dataset, tmp_path):
    """schedule_epochs is a OneCycle's length; a constant learning rate has none, so its run can
    be resumed for more epochs (a OneCycle run cannot: the parametrised test above)."""
    config = tiny_config(tiny_dataset, tmp_path)
    config.train.schedule = "constant"
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(workdir, config)
    config.train.epochs = config.train.schedule_epochs = config.train.schedule_epochs + 3
    check_config(workdir, config, training=True)
    config.train.schedule = "onecycle"  # a change of kind is refused (state_layout)
    with pytest.raises(WorkdirError, match="trained with train.schedule='constant'"):
        check_config(workdir, config, training=True)


def test_the_linear_heads_pooling_is_free_under_another_head(tiny_dataset, tmp_path):
    """model.global_pool is read by the linear head alone: with CSRA it changes nothing."""
    config = tiny_config(tiny_dataset, tmp_path)
    config.model.head = "csra"
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(workdir, config)
    config.model.global_pool = "max"
    for training in (True, False):
        check_config(workdir, config, training=training)


@pytest.mark.parametrize("changes, refused", [
    ({"ema_decay": 0.999}, "train.ema_decay=0.0, not train.ema_decay=0.999"),
    ({"optimizer": "adamw"}, "train.optimizer='adam', not train.optimizer='adamw'"),
    ({"weight_decay": 0.0}, "train.weight_decay=0.0001, not train.weight_decay=0.0"),
    ({"weight_decay": 1e-2}, None), ({"optimizer": "adamw", "weight_decay": 0.0}, "optimizer"),
    ({"schedule": "constant"}, "train.schedule='onecycle', not train.schedule='constant'"),
    ({"cycle_momentum": False}, "train.cycle_momentum=True, not train.cycle_momentum=False")])
def test_a_config_whose_checkpoints_hold_other_state_is_refused(tiny_dataset, tmp_path, changes,
                                                                refused):
    """EMA on or off, AdamW, Adam with or without its weight-decay step, a constant or scheduled
    learning rate, a cycled beta1 or not change the tree of what a checkpoint holds: resuming or
    evaluating with them is refused by name, before any restore (which could only say the
    checkpoint does not fit); another weight decay is not."""
    config = tiny_config(tiny_dataset, tmp_path)
    config.train.weight_decay = 1e-4
    assert config.train.optimizer == "adam"
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(workdir, config)
    config.train.update(changes)
    for training in (True, False):
        if refused is None:
            check_config(workdir, config, training=training)
        else:
            with pytest.raises(WorkdirError, match=re.escape(refused)):
                check_config(workdir, config, training=training)


def test_state_layout_tells_exactly_which_configs_give_one_optimizer_state_tree(tiny_dataset,
                                                                               tmp_path):
    """state_layout, which check_config compares, against the optimizer state train.py builds:
    two settings have one layout exactly when their optimizer states have one tree structure
    (EMA, the layout's other part, is not in the optimizer state)."""
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    structures, layouts = [], []
    for optimizer, weight_decay, schedule, cycle_momentum in itertools.product(
            ("adam", "adamw"), (0.0, 1e-4), ("onecycle", "constant"), (True, False)):
        config = tiny_config(tiny_dataset, tmp_path)
        config.train.update(optimizer=optimizer, weight_decay=weight_decay, schedule=schedule,
                            cycle_momentum=cycle_momentum)
        structures.append(jax.tree.structure(train.make_optimizer(config, 100).init(params)))
        layouts.append({k: v for k, v in state_layout(config).items() if k != "train.ema_decay"})
    for (structure_a, layout_a), (structure_b, layout_b) in itertools.combinations(
            zip(structures, layouts), 2):
        assert (structure_a == structure_b) == (layout_a == layout_b), (layout_a, layout_b)
    # Adam, Adam + decay step, AdamW, each with a constant, scheduled or scheduled + cycled beta1
    assert len({str(structure) for structure in structures}) == 9


def test_write_config_is_atomic_and_warns_on_a_change(tiny_dataset, tmp_path, caplog):
    config = tiny_config(tiny_dataset, tmp_path)
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(workdir, config)
    config.train.learning_rate = 0.5
    write_config(workdir, config)
    assert json.loads((workdir / "config.json").read_text())["train"]["learning_rate"] == 0.5
    assert "config differs" in caplog.text and "train.learning_rate: " in caplog.text
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]  # no temporary left


def test_a_resume_with_other_settings_keeps_the_config_that_trained_the_epochs_so_far(
        tiny_dataset, tmp_path, caplog):
    config = tiny_config(tiny_dataset, tmp_path)
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(workdir, config)
    first_rate = config.train.learning_rate
    config.train.learning_rate, config.train.log_every = 0.5, 7
    write_config(workdir, config, start_epoch=3)  # resumed after 3 epochs with two changes
    assert (f"train.learning_rate: {first_rate!r} -> 0.5" in caplog.text
            and "train.log_every: " in caplog.text and "-> 7" in caplog.text)
    config.train.learning_rate = 0.25  # killed before epoch 4's checkpoint, resumed again
    write_config(workdir, config, start_epoch=3)
    trained = json.loads((workdir / "config.until-epoch-3.json").read_text())
    assert trained["train"]["learning_rate"] == first_rate  # not 0.5, which trained nothing kept
    assert json.loads((workdir / "config.json").read_text())["train"]["learning_rate"] == 0.25
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json", "config.until-epoch-3.json"]


class _FailingSaves:
    """Stands in for the orbax manager: saves succeed until `fail_after`, then the background
    write 'fails' (as a full disk does) and check_for_errors raises."""

    def __init__(self, manager, fail_after: int):
        self.manager, self.fail_after, self.saved = manager, fail_after, 0

    def __getattr__(self, name):
        return getattr(self.manager, name)

    def save(self, *args, **kwargs):
        self.saved += 1
        return self.manager.save(*args, **kwargs)

    def check_for_errors(self):
        if self.saved > self.fail_after:
            raise OSError(28, "No space left on device")


def test_a_failed_checkpoint_save_stops_the_run_at_once(tiny_dataset, tiny_backbone, tmp_path,
                                                        monkeypatch):
    real = train.checkpoint_manager
    monkeypatch.setattr(train, "checkpoint_manager", lambda workdir: _FailingSaves(real(workdir), 1))
    config = tiny_config(tiny_dataset, tmp_path / "cache")
    with pytest.raises(CheckpointSaveError, match=r"saving a checkpoint in .*checkpoints failed "
                                                  r"\(OSError: \[Errno 28\] No space left"):
        train.train_and_evaluate(config, tmp_path / "run")
    # epoch 2's save failed: seen on the first step of epoch 3, which never finished
    assert [r["epoch"] for r in training_log.read_metrics(tmp_path / "run")] == [1, 2]


def test_a_torn_last_metrics_line_is_dropped_on_resume(tiny_dataset, tiny_backbone, tmp_path,
                                                       caplog):
    config = tiny_config(tiny_dataset, tmp_path / "cache")
    config.train.epochs = 1  # of a 3-epoch schedule
    train.train_and_evaluate(config, tmp_path / "run")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as file:
        file.write('{"epoch": 2, "train/lo')  # a kill during the append
    config.train.epochs = 2
    train.train_and_evaluate(config, tmp_path / "run")
    assert [r["epoch"] for r in training_log.read_metrics(tmp_path / "run")] == [1, 2]
    assert "dropping its torn last line" in caplog.text
    (tmp_path / "run" / "metrics.jsonl").write_text('{"epoch": 1\n{"epoch": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a JSON record"):
        training_log.read_metrics(tmp_path / "run")
    # a resume refused for it records nothing: config.json stays that of the epochs trained
    files = {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir()
             if path.is_file()}
    config.train.epochs = 3
    with pytest.raises(ValueError, match=r"metrics.jsonl, line 1: not a JSON record"):
        train.train_and_evaluate(config, tmp_path / "run")
    assert {path.name: path.read_bytes() for path in (tmp_path / "run").iterdir()
            if path.is_file()} == files


def test_write_atomically_replaces_whole_files_or_nothing(tmp_path):
    path = tmp_path / "results.json"
    write_atomically(path, "first")
    write_atomically(path, lambda file: file.write(b"second"))
    assert path.read_text() == "second"
    write_atomically(path, b"third")
    assert path.read_text() == "third"

    def fails_half_way(file):
        file.write(b"half")
        raise OSError(28, "No space left on device")
    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, fails_half_way)
    assert path.read_text() == "third" and sorted(p.name for p in tmp_path.iterdir()) == [
        "results.json"]


def test_a_write_killed_midway_is_deleted_when_a_run_takes_the_workdir(tmp_path):
    """A process killed inside write_atomically leaves its hidden file; the next run that takes the
    workdir deletes it, but not a running writer's, nor other hidden files."""
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from annotate.workdir import write_atomically; write_atomically(Path(sys.argv[1]), "
         "lambda file: (file.write(b'half'), file.flush(), print('writing', flush=True), "
         "time.sleep(120)))", str(tmp_path / "results.json")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "writing\n"
        (half,) = tmp_path.glob(".results.json.*.tmp")
        assert half.name == f".results.json.{writer.pid}-{half.name.split('-')[1]}"
        other = tmp_path / ".notes.tmp"  # not write_atomically's
        other.write_text("kept")
        with WorkdirLock(tmp_path):  # the writer is running: its file stays
            assert half.read_text() == "half"
    finally:
        writer.kill()
        writer.wait()
    with WorkdirLock(tmp_path):
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".notes.tmp"]


def test_an_empty_young_temporary_file_is_a_writer_about_to_take_its_flock(tmp_path):
    """A writer creates its hidden file, then takes its flock, then writes: an empty file nobody
    holds may be a writer's between the two, and stays while younger than FRESH_SECONDS (deleting
    it would fail that write's rename); an empty one older than that, or one holding bytes, was
    left by a killed writer."""
    empty, written = tmp_path / ".results.json.4242-7.tmp", tmp_path / ".metrics.jsonl.4242-8.tmp"
    empty.touch()
    written.write_bytes(b"half")
    assert (is_abandoned(empty), is_abandoned(written)) == (False, True)
    old = time.time() - FRESH_SECONDS - 1
    os.utime(empty, (old, old))
    assert is_abandoned(empty)


@pytest.mark.parametrize("content,detail", [('{"model": ', "JSONDecodeError: "),
                                            ("[]", "a JSON list, not an object")])
def test_a_damaged_config_json_is_named(tiny_dataset, tmp_path, caplog, content, detail):
    """A config.json that is not a JSON object (edited by hand, damaged) is named when a resume
    or an evaluation checks it; a run without checkpoints replaces it."""
    config = tiny_config(tiny_dataset, tmp_path)
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text(content)
    for training in (True, False):
        with pytest.raises(WorkdirError, match=re.escape(
                f"{workdir / 'config.json'} is damaged ({detail}")):
            check_config(workdir, config, training=training)
    write_config(workdir, config)
    assert json.loads((workdir / "config.json").read_text())["seed"] == config.seed
    assert "config differs" in caplog.text


def test_a_torn_lock_is_taken_over_once_it_is_old_and_refused_while_young(tmp_path):
    lock = tmp_path / ".lock"
    lock.write_text("")  # created, not yet written: a run starting right now
    with pytest.raises(WorkdirError, match="a moment ago"):
        with WorkdirLock(tmp_path):
            pass
    old = time.time() - 3600  # its writer died while writing it an hour ago
    os.utime(lock, (old, old))
    with WorkdirLock(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_a_head_without_a_config_section_resumes_and_evaluates(tiny_dataset, tmp_path,
                                                               monkeypatch):
    """A registered head with no config.model.<head> options (head_options gives it none) passes
    the checks of a resume or an evaluation instead of failing with a KeyError."""
    monkeypatch.setitem(models._HEADS, "bare", "heads:LinearHead")
    config = tiny_config(tiny_dataset, tmp_path)
    config.model.head = "bare"
    workdir = tmp_path / "run"
    workdir.mkdir()
    write_config(workdir, config)
    for training in (True, False):
        check_config(workdir, config, training=training)
