"""TensorBoard scalars without the tensorboard package.

An event file is a TFRecord stream of `Event` protocol buffers; scalars need only a handful
of fields, encoded here by hand, so training logs open in TensorBoard with no extra dependency.
"""

from __future__ import annotations

import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def _event(step: int, wall_time: float, *, file_version: str | None = None, scalars: dict | None = None) -> bytes:
    body = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        body += _field(3, 2, file_version.encode())
    if scalars:
        values = b"".join(
            _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(value))))
            for tag, value in scalars.items()
        )
        body += _field(5, 2, values)
    return body


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", masked_crc(header)) + data + struct.pack("<I", masked_crc(data))


class SummaryWriter:
    """Appends scalar summaries to an event file in `log_dir`; flushes after every write."""

    def __init__(self, log_dir: str | Path):
        self.path = Path(log_dir) / f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.igpt"
        self._file = open(self.path, "ab")
        self._file.write(_record(_event(0, time.time(), file_version="brain.Event:2")))
        self._file.flush()

    def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._file.write(_record(_event(step, time.time(), scalars=scalars)))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_scalars(path: str | Path) -> list[tuple[int, str, float]]:
    """(step, tag, value) for every scalar in an event file, checking each record's checksums."""
    data = Path(path).read_bytes()
    out, pos = [], 0
    while pos < len(data):
        (length,) = struct.unpack_from("<Q", data, pos)
        header, body = data[pos : pos + 8], data[pos + 12 : pos + 12 + length]
        if struct.unpack_from("<I", data, pos + 8)[0] != masked_crc(header):
            raise ValueError(f"corrupt record header at byte {pos}")
        if struct.unpack_from("<I", data, pos + 12 + length)[0] != masked_crc(body):
            raise ValueError(f"corrupt record at byte {pos}")
        pos += 16 + length
        fields = dict(_parse(body))
        for tag, value in _summary_values(fields.get(5, b"")):
            out.append((fields.get(2, 0), tag, value))
    return out


def _parse(buf: bytes):
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _read_varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            size, pos = _read_varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        yield number, value


def _summary_values(summary: bytes):
    for number, value in _parse(summary):
        if number == 1:
            fields = dict(_parse(value))
            if 2 in fields:
                yield fields[1].decode(), struct.unpack("<f", fields[2])[0]


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return result, pos
