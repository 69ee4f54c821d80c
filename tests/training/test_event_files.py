"""The hand-written TensorBoard event files parse as tensorflow.Event protos (checked with a
protobuf schema built here: summary.proto / event.proto field numbers) and carry valid
TFRecord CRC-32C framing."""

import struct

import pytest

from adastate_jax.training import loop


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
        assert hcrc == loop._masked_crc(data[i : i + 8])
        payload = data[i + 12 : i + 12 + n]
        (dcrc,) = struct.unpack("<I", data[i + 12 + n : i + 16 + n])
        assert dcrc == loop._masked_crc(payload)
        out.append(payload)
        i += 16 + n
    return out


def test_event_file_parses_as_tensorflow_events(tmp_path):
    assert loop.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    w = loop.EventFileWriter(str(tmp_path))
    w.write(7, {"loss": 0.25, "grad_norm": 1.5})
    w.write(300, {"loss": 0.125})
    w.close()
    Event = _event_class()
    events = [Event.FromString(r) for r in _records(w.path)]
    assert events[0].file_version == "brain.Event:2"
    assert events[1].step == 7 and {v.tag: v.simple_value for v in events[1].summary.value} == {
        "loss": 0.25,
        "grad_norm": 1.5,
    }
    assert events[2].step == 300 and events[2].summary.value[0].simple_value == 0.125
