"""metrics.jsonl and the TensorBoard scalars, read back by TensorBoard's own event-file loader."""
from __future__ import annotations

import json

from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from annotate import summary


def _events(log_dir):
    (path,) = log_dir.glob("events.out.tfevents.*")
    return list(EventFileLoader(str(path)).Load())


def _scalars(event) -> dict[str, float]:
    # TensorBoard's loader turns simple_value into a float tensor
    return {value.tag: value.simple_value or value.tensor.float_val[0]
            for value in event.summary.value}


def test_event_file_reads_with_tensorboard(tmp_path):
    writer = summary.TensorBoardWriter(tmp_path)
    writer.scalars(3, {"train/loss": 0.25, "test/per_class_f1": 0.5})
    writer.scalars(2**40, {"train/loss": -1.5, "skipped": float("nan")})
    writer.scalars(7, {"test/n_plus": 12})
    events = _events(tmp_path)  # flushed by scalars(): readable before close()
    assert events[0].file_version == "brain.Event:2"
    assert [e.step for e in events[1:]] == [3, 2**40, 7]
    assert _scalars(events[1]) == {"train/loss": 0.25, "test/per_class_f1": 0.5}
    assert _scalars(events[2]) == {"train/loss": -1.5}  # non-finite values are left out
    assert _scalars(events[3]) == {"test/n_plus": 12.0}
    assert all(e.wall_time > 1.6e9 for e in events)
    writer.close()


def test_metrics_jsonl_round_trip(tmp_path):
    writer = summary.MetricsWriter(tmp_path)
    writer.write(10, {"epoch": 1, "train/loss": 0.5})
    writer.write(20, {"epoch": 2, "train/loss": 0.25})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 10, "epoch": 1, "train/loss": 0.5}, {"step": 20, "epoch": 2, "train/loss": 0.25}]
    assert summary.read_metrics(tmp_path) == [json.loads(line) for line in lines]
    assert summary.read_metrics(tmp_path / "absent") == []
    events = _events(tmp_path / "tensorboard")
    assert [(e.step, _scalars(e)) for e in events[1:]] == [
        (10, {"epoch": 1.0, "train/loss": 0.5}), (20, {"epoch": 2.0, "train/loss": 0.25})]
    writer.close()
