"""TensorBoard event files for scalars, written without tensorboardX or TensorFlow.

A run's `tensorboard/` folder holds one `events.out.tfevents.*` file: a TFRecord stream of `Event`
protocol buffers (tensorboard/compat/proto/event.proto). Titans logs scalars only, and those few
messages are encoded here by hand. tensorboardX, the library this replaces, imports PyTorch whenever it
is installed. That costs a JAX training process 2-4 s of start-up on this project's machines, for
nothing it uses.

Record framing (TFRecord): length as uint64 little-endian, the masked CRC-32C of those 8 bytes, the
payload, the masked CRC-32C of the payload. The messages used, with their field numbers:

    Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
    Summary { repeated Value value = 1; }
    Value   { string tag = 1; float simple_value = 2; }
"""

from __future__ import annotations

import os
import socket
import struct
import time

from titans import paths


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli polynomial, reflected
        table.append(crc)
    return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(payload: bytes) -> bytes:
    length = struct.pack("<Q", len(payload))
    return length + struct.pack("<I", masked_crc32c(length)) + payload + struct.pack("<I", masked_crc32c(payload))


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # a negative int64 is ten bytes of two's complement
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, wire_type: int, body: bytes) -> bytes:
    key = _varint((number << 3) | wire_type)
    if wire_type == 2:  # length-delimited
        return key + _varint(len(body)) + body
    return key + body


def _event(wall_time: float, step: int | None = None, file_version: str | None = None, summary: bytes | None = None):
    out = _field(1, 1, struct.pack("<d", wall_time))
    if step is not None:
        out += _field(2, 0, _varint(step))
    if file_version is not None:
        out += _field(3, 2, file_version.encode())
    if summary is not None:
        out += _field(5, 2, summary)
    return out


def scalars_event(values: dict[str, float], step: int, wall_time: float) -> bytes:
    """One Event holding a Summary with one simple_value per tag."""
    summary = b"".join(
        _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
        for tag, v in values.items()
    )
    return _event(wall_time, step=step, summary=summary)


class EventWriter:
    """Appends scalar summaries to a new event file in `logdir`; readable by TensorBoard while open."""

    def __init__(self, logdir):
        paths.makedirs(logdir)
        now = time.time()
        # TensorBoard finds files by the "tfevents" in their names and orders them by this timestamp; the
        # host and pid keep two writers (a resumed run, another process) from sharing a file.
        name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}.{id(self)}"
        self.path = paths.join(logdir, name)
        self._file = paths.AppendFile(self.path, binary=True)  # local: flushed per write; a bucket: uploaded
        self._file.write(tfrecord(_event(now, file_version="brain.Event:2")))

    def scalars(self, values: dict[str, float], step: int) -> None:
        if values:
            self._file.write(tfrecord(scalars_event(values, step, time.time())))

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
