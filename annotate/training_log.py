"""Training logs: `metrics.jsonl` (one JSON object per line) and TensorBoard scalars.

The TensorBoard events are written by the tensorboard package's own event-file writer (no
TensorFlow needed), one file per run segment in workdir/tensorboard. Each segment starts with a
SessionLog.START event at its first step: TensorBoard then drops what an earlier, killed segment
wrote from that step on (an epoch logged before its checkpoint was saved), as a resume drops
that epoch's line of metrics.jsonl.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from pathlib import Path

from tensorboard.compat.proto.event_pb2 import Event, SessionLog
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter

from annotate.workdir import write_atomically

log = logging.getLogger(__name__)


class TensorBoardWriter:
    """Scalars into a new `events.out.tfevents.*` file in `log_dir`, for steps from
    `first_step` on (TensorBoard discards earlier files' events at or after it)."""

    def __init__(self, log_dir: Path | str, first_step: int = 0):
        self.writer = EventFileWriter(str(log_dir))
        self.writer.add_event(Event(wall_time=time.time(), step=first_step,
                                    session_log=SessionLog(status=SessionLog.START)))
        self.writer.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Write the finite scalars of `values` at `step`, flushed at once (a killed run loses
        nothing already written)."""
        finite = [Summary.Value(tag=tag, simple_value=float(value))
                  for tag, value in values.items() if math.isfinite(float(value))]
        self.writer.add_event(Event(wall_time=time.time(), step=step,
                                    summary=Summary(value=finite)))
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class MetricsWriter:
    """Writes each record to `workdir/metrics.jsonl` and its numbers to TensorBoard, for a run
    segment whose steps start at `first_step`."""

    def __init__(self, workdir: Path | str, first_step: int = 0):
        self.jsonl_path = Path(workdir) / "metrics.jsonl"
        self.tensorboard = TensorBoardWriter(Path(workdir) / "tensorboard", first_step)

    def write(self, step: int, metrics: Mapping[str, float | int]) -> None:
        """Append `{"step": step, **metrics}` as one JSON line and as TensorBoard scalars."""
        with open(self.jsonl_path, "a") as file:
            file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.tensorboard.scalars(step, metrics)

    def close(self) -> None:
        self.tensorboard.close()


def read_metrics(workdir: Path | str) -> list[dict]:
    """All records of `workdir/metrics.jsonl` (empty list when the file does not exist). A torn
    last line (a kill or a full disk during the append) is dropped with a warning; a damaged
    line before it is an error naming the file and the line."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number < len(lines):
                raise ValueError(f"{path}, line {number}: not a JSON record ({error})") from error
            log.warning("%s: dropping its torn last line %d (%r)", path, number, line[:80])
    return records


def rewrite_metrics(workdir: Path | str, records: list[dict]) -> None:
    """Replace `workdir/metrics.jsonl` by `records`, atomically (a rename of a written file)."""
    path = Path(workdir) / "metrics.jsonl"
    write_atomically(path, "".join(json.dumps(record) + "\n" for record in records))
