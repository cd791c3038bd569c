"""metrics.jsonl and the TensorFlow-free TensorBoard writer, read back by independent decoders:
protobuf's own parser (Event/Summary descriptors built here from TensorFlow's field numbers) and,
when installed, TensorBoard's EventFileLoader."""
from __future__ import annotations

import json
import struct
import zlib

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from annotate import summary


def _event_class():
    """tensorflow.Event / Summary as dynamic protobuf classes (field numbers of event.proto and
    summary.proto), so the bytes are parsed by protobuf, not by our encoder's logic."""
    field = descriptor_pb2.FieldDescriptorProto
    proto = descriptor_pb2.FileDescriptorProto(name="test_event.proto", package="testtf")
    value = proto.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    value.field.add(name="simple_value", number=2, type=field.TYPE_FLOAT, label=field.LABEL_OPTIONAL)
    summary_message = proto.message_type.add(name="Summary")
    summary_message.field.add(name="value", number=1, type=field.TYPE_MESSAGE,
                              type_name=".testtf.Value", label=field.LABEL_REPEATED)
    event = proto.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=field.TYPE_DOUBLE, label=field.LABEL_OPTIONAL)
    event.field.add(name="step", number=2, type=field.TYPE_INT64, label=field.LABEL_OPTIONAL)
    event.field.add(name="file_version", number=3, type=field.TYPE_STRING, label=field.LABEL_OPTIONAL)
    event.field.add(name="summary", number=5, type=field.TYPE_MESSAGE, type_name=".testtf.Summary",
                    label=field.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("testtf.Event"))


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def _read_records(path):
    blob, records, offset = path.read_bytes(), [], 0
    while offset < len(blob):
        (length,) = struct.unpack_from("<Q", blob, offset)
        header = blob[offset:offset + 8]
        (length_crc,) = struct.unpack_from("<I", blob, offset + 8)
        payload = blob[offset + 12:offset + 12 + length]
        (payload_crc,) = struct.unpack_from("<I", blob, offset + 12 + length)
        for data, crc in ((header, length_crc), (payload, payload_crc)):
            raw = _crc32c_bitwise(data)
            assert crc == (((raw >> 15) | (raw << 17)) + 0xA282EAD8) & 0xFFFFFFFF
        records.append(payload)
        offset += 12 + length + 4
    return records


def test_crc32c_known_values():
    # RFC 3720 (iSCSI) test vectors for CRC-32C; zlib.crc32 (plain CRC-32) must differ.
    assert summary.crc32c(b"123456789") == 0xE3069283
    assert summary.crc32c(bytes(32)) == 0x8A9136AA
    assert summary.crc32c(b"123456789") != zlib.crc32(b"123456789")


def test_event_file_parses_with_protobuf(tmp_path):
    writer = summary.TensorBoardWriter(tmp_path)
    writer.scalars(3, {"train/loss": 0.25, "test/per_class_f1": 0.5})
    writer.scalars(2**40, {"train/loss": -1.5, "skipped": float("nan")})
    event_class = _event_class()
    events = [event_class.FromString(record) for record in _read_records(writer.path)]
    assert events[0].file_version == "brain.Event:2"
    assert [e.step for e in events[1:]] == [3, 2**40]
    assert {v.tag: v.simple_value for v in events[1].summary.value} == {
        "train/loss": 0.25, "test/per_class_f1": 0.5}
    assert [(v.tag, v.simple_value) for v in events[2].summary.value] == [("train/loss", -1.5)]
    assert all(e.wall_time > 1.6e9 for e in events)


def test_event_file_reads_with_tensorboard(tmp_path):
    loader_module = pytest.importorskip("tensorboard.backend.event_processing.event_file_loader")
    writer = summary.TensorBoardWriter(tmp_path)
    writer.scalars(7, {"test/n_plus": 12.0})
    events = list(loader_module.EventFileLoader(str(writer.path)).Load())
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 7
    value = events[1].summary.value[0]
    assert value.tag == "test/n_plus"
    # newer TensorBoard converts simple_value to a tensor on load
    assert (value.simple_value or value.tensor.float_val[0]) == 12.0


def test_metrics_jsonl_round_trip(tmp_path):
    writer = summary.MetricsWriter(tmp_path)
    writer.write(10, {"epoch": 1, "train/loss": 0.5})
    writer.write(20, {"epoch": 2, "train/loss": 0.25})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 10, "epoch": 1, "train/loss": 0.5}, {"step": 20, "epoch": 2, "train/loss": 0.25}]
    assert summary.read_metrics(tmp_path) == [json.loads(line) for line in lines]
    assert summary.read_metrics(tmp_path / "absent") == []
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
