"""metrics.jsonl and the TensorBoard scalars, read back by TensorBoard's own event-file loader."""
from __future__ import annotations

import json
import time

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

from annotate import training_log


def _events(log_dir):
    (path,) = log_dir.glob("events.out.tfevents.*")
    return list(EventFileLoader(str(path)).Load())


def _scalars(event) -> dict[str, float]:
    # TensorBoard's loader turns simple_value into a float tensor
    return {value.tag: value.simple_value or value.tensor.float_val[0]
            for value in event.summary.value}


def test_event_file_reads_with_tensorboard(tmp_path):
    writer = training_log.TensorBoardWriter(tmp_path)
    writer.scalars(3, {"train/loss": 0.25, "test/per_class_f1": 0.5})
    writer.scalars(2**40, {"train/loss": -1.5, "skipped": float("nan")})
    writer.scalars(7, {"test/n_plus": 12})
    events = _events(tmp_path)  # flushed by scalars(): readable before close()
    assert events[0].file_version == "brain.Event:2"
    assert events[1].session_log.status == events[1].session_log.START
    events = events[2:]
    assert [e.step for e in events] == [3, 2**40, 7]
    assert _scalars(events[0]) == {"train/loss": 0.25, "test/per_class_f1": 0.5}
    assert _scalars(events[1]) == {"train/loss": -1.5}  # non-finite values are left out
    assert _scalars(events[2]) == {"test/n_plus": 12.0}
    assert all(e.wall_time > 1.6e9 for e in events)
    writer.close()


def test_metrics_jsonl_round_trip(tmp_path):
    writer = training_log.MetricsWriter(tmp_path)
    writer.write(10, {"epoch": 1, "train/loss": 0.5})
    writer.write(20, {"epoch": 2, "train/loss": 0.25})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 10, "epoch": 1, "train/loss": 0.5}, {"step": 20, "epoch": 2, "train/loss": 0.25}]
    assert training_log.read_metrics(tmp_path) == [json.loads(line) for line in lines]
    assert training_log.read_metrics(tmp_path / "absent") == []
    events = _events(tmp_path / "tensorboard")
    assert [(e.step, _scalars(e)) for e in events[2:]] == [
        (10, {"epoch": 1.0, "train/loss": 0.5}), (20, {"epoch": 2.0, "train/loss": 0.25})]
    writer.close()


def test_tensorboard_drops_what_a_killed_segment_logged_past_its_checkpoint(tmp_path):
    """A run logs epochs 1-3 (3 steps each) and is killed before epoch 3's checkpoint; the resumed
    segment starts at step 7 and logs epochs 3 and 4 again. TensorBoard's own accumulator shows
    each epoch once, epoch 3 from the resumed segment, as metrics.jsonl does."""
    first = training_log.MetricsWriter(tmp_path)
    for epoch in (1, 2, 3):
        first.write(3 * epoch, {"epoch": epoch, "train/loss": 1.0 / epoch})
    first.close()
    time.sleep(1.1)  # event files are ordered by their names, which start with the second
    resumed = training_log.MetricsWriter(tmp_path, first_step=2 * 3 + 1)
    for epoch in (3, 4):
        resumed.write(3 * epoch, {"epoch": epoch, "train/loss": 10.0 / epoch})
    resumed.close()
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    losses = accumulator.Tensors("train/loss")
    assert [event.step for event in losses] == [3, 6, 9, 12]
    assert [event.tensor_proto.float_val[0] for event in losses] == pytest.approx(
        [1.0, 0.5, 10.0 / 3, 2.5], rel=1e-6)
