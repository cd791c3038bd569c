"""Training logs: `metrics.jsonl` (one JSON object per line) and TensorBoard scalars.

The TensorBoard writer needs no TensorFlow: an event file is a TFRecord stream (length, masked
CRC-32C of the length, payload, masked CRC-32C of the payload) of `tensorflow.Event` protobufs,
and the few fields used here (wall_time, step, file_version, summary.value{tag, simple_value})
are encoded by hand below.
"""
from __future__ import annotations

import json
import math
import socket
import struct
import time
from collections.abc import Mapping
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of the TFRecord format."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 bits and add a constant (mod 2**32)."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    """Frame one record: uint64 length, masked CRC of the length, payload, masked CRC of it."""
    length = struct.pack("<Q", len(payload))
    return (length + struct.pack("<I", masked_crc32c(length)) + payload
            + struct.pack("<I", masked_crc32c(payload)))


def _varint(value: int) -> bytes:
    out = bytearray()
    value &= (1 << 64) - 1  # int64 fields encode negatives as ten-byte two's complement
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _length_delimited(field: int, payload: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(payload)) + payload


def scalar_summary(values: Mapping[str, float]) -> bytes:
    """A `Summary` protobuf with one `Value{tag=1, simple_value=2 (float32)}` per scalar."""
    return b"".join(
        _length_delimited(1, _length_delimited(1, tag.encode()) + b"\x15" + struct.pack("<f", value))
        for tag, value in values.items())


def event(wall_time: float, step: int, *, summary: bytes | None = None,
          file_version: str | None = None) -> bytes:
    """An `Event` protobuf: wall_time (1, double), step (2, int64), file_version (3), summary (5)."""
    out = b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if summary is not None:
        out += _length_delimited(5, summary)
    return out


class TensorBoardWriter:
    """Appends scalar events to a new `events.out.tfevents.*` file in `log_dir`."""

    def __init__(self, log_dir: Path | str):
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = log_dir / f"events.out.tfevents.{int(now)}.{socket.gethostname()}"
        with open(self.path, "ab") as file:
            file.write(tfrecord(event(now, 0, file_version="brain.Event:2")))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """Write finite scalars `values` at `step` (flushed at once: a killed run loses nothing)."""
        finite = {tag: float(v) for tag, v in values.items() if math.isfinite(float(v))}
        with open(self.path, "ab") as file:
            file.write(tfrecord(event(time.time(), step, summary=scalar_summary(finite))))


class MetricsWriter:
    """Writes each record to `workdir/metrics.jsonl` and its numbers to TensorBoard."""

    def __init__(self, workdir: Path | str):
        self.jsonl_path = Path(workdir) / "metrics.jsonl"
        self.tensorboard = TensorBoardWriter(Path(workdir) / "tensorboard")

    def write(self, step: int, metrics: Mapping[str, float | int]) -> None:
        """Append `{"step": step, **metrics}` as one JSON line and as TensorBoard scalars."""
        with open(self.jsonl_path, "a") as file:
            file.write(json.dumps({"step": step, **metrics}) + "\n")
        self.tensorboard.scalars(step, metrics)


def read_metrics(workdir: Path | str) -> list[dict]:
    """All records of `workdir/metrics.jsonl` (empty list when the file does not exist)."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
