"""titans.tensorboard: the hand-encoded event files, read back with independent code (the protobuf
classes and CRC-32C that tensorboardX ships, which Titans itself no longer imports)."""

from __future__ import annotations

import math
import os
import struct
import subprocess
import sys

import pytest

from titans import logs, tensorboard

event_pb2 = pytest.importorskip("tensorboardX.proto.event_pb2")
tbx_crc = pytest.importorskip("tensorboardX.record_writer")  # its masked_crc32c


def read_records(path):
    """(payloads) of a TFRecord file, checking both masked CRCs with tensorboardX's implementation."""
    out = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (crc_len,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        payload = data[pos + 12 : pos + 12 + length]
        (crc_data,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert crc_len == tbx_crc.masked_crc32c(header)
        assert crc_data == tbx_crc.masked_crc32c(payload)
        out.append(payload)
        pos += 16 + length
    assert pos == len(data)
    return out


def test_crc32c_known_answer():
    # The CRC-32C check value (RFC 3720, appendix B.4) and an all-zero block of 32 bytes.
    assert tensorboard.crc32c(b"123456789") == 0xE3069283
    assert tensorboard.crc32c(bytes(32)) == 0x8A9136AA


def test_metric_writer_events_parse_as_tensorboard_events(tmp_path):
    w = logs.MetricWriter(str(tmp_path))
    w.write(10, {"loss": 1.25, "accuracy": 0.5, "lr": float("nan"), "note": "text"}, prefix="train/")
    w.write(2**40, {"loss": 0.75})
    w.write(20, {})
    w.close()
    (name,) = os.listdir(tmp_path / "tensorboard")
    assert "tfevents" in name
    events = [event_pb2.Event.FromString(p) for p in read_records(tmp_path / "tensorboard" / name)]
    assert events[0].file_version == "brain.Event:2"
    got = [(e.step, v.tag, v.simple_value) for e in events[1:] for v in e.summary.value]
    # Non-finite and non-numeric values are left out, as in metrics.jsonl's TensorBoard mirror before.
    assert got == [(10, "train/loss", 1.25), (10, "train/accuracy", 0.5), (2**40, "loss", 0.75)]
    assert all(abs(e.wall_time - events[0].wall_time) < 60 for e in events)


def test_negative_step_and_float32_rounding():
    event = event_pb2.Event.FromString(tensorboard.scalars_event({"x": 0.1}, step=-3, wall_time=1.5))
    assert event.step == -3 and event.wall_time == 1.5
    assert event.summary.value[0].simple_value == struct.unpack("<f", struct.pack("<f", 0.1))[0]
    assert not math.isclose(event.summary.value[0].simple_value, 0.1, rel_tol=1e-9)


def test_logging_metrics_does_not_import_torch(tmp_path):
    # tensorboardX imported PyTorch whenever it was installed: seconds of every training start-up.
    code = (
        "import sys; from titans import logs; w = logs.MetricWriter(sys.argv[1]); w.write(1, {'a': 1.0}); w.close(); "
        "print('torch' in sys.modules, 'tensorboardX' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
