"""The train loop's TensorBoard event files (written through tensorboardX) parse as
tensorflow.Event protos (checked with a protobuf schema built here: summary.proto / event.proto
field numbers) and carry valid TFRecord CRC-32C framing."""

import glob
import json
import os
import struct

import pytest

from adastate_jax.training import loop


def _masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC-32C, computed bit by bit here (an independent check of the framing)."""
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
    c ^= 0xFFFFFFFF
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _event_class():
    descriptor_pb2 = pytest.importorskip("google.protobuf.descriptor_pb2")
    from google.protobuf import descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(name="tb_event_for_test.proto", package="tbtest")
    value = f.message_type.add(name="Value")
    value.field.add(name="tag", number=1, type=9, label=1)  # string
    value.field.add(name="simple_value", number=2, type=2, label=1)  # float
    summary = f.message_type.add(name="Summary")
    summary.field.add(name="value", number=1, type=11, label=3, type_name=".tbtest.Value")
    event = f.message_type.add(name="Event")
    event.field.add(name="wall_time", number=1, type=1, label=1)  # double
    event.field.add(name="step", number=2, type=3, label=1)  # int64
    event.field.add(name="file_version", number=3, type=9, label=1)
    event.field.add(name="summary", number=5, type=11, label=1, type_name=".tbtest.Summary")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tbtest.Event"))


def _records(path):
    with open(path, "rb") as fh:
        data = fh.read()
    i, out = 0, []
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        (hcrc,) = struct.unpack("<I", data[i + 8 : i + 12])
        assert hcrc == _masked_crc(data[i : i + 8])
        payload = data[i + 12 : i + 12 + n]
        (dcrc,) = struct.unpack("<I", data[i + 12 + n : i + 16 + n])
        assert dcrc == _masked_crc(payload)
        out.append(payload)
        i += 16 + n
    return out


def test_metrics_writer_event_file_parses_as_tensorflow_events(tmp_path):
    w = loop.MetricsWriter(str(tmp_path))
    w.write(7, {"loss": 0.25, "grad_norm": 1.5})
    w.write(300, {"loss": 0.125})
    w.close()
    (path,) = glob.glob(os.path.join(str(tmp_path), "tb", "events.out.tfevents.*"))
    Event = _event_class()
    events = [Event.FromString(r) for r in _records(path)]
    assert events[0].file_version == "brain.Event:2"
    scalars = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    assert sorted(scalars) == sorted([(7, "loss", 0.25), (7, "grad_norm", 1.5), (300, "loss", 0.125)])
    rows = [json.loads(line) for line in open(os.path.join(str(tmp_path), "metrics.jsonl"))]
    assert rows == [{"step": 7, "loss": 0.25, "grad_norm": 1.5}, {"step": 300, "loss": 0.125}]
