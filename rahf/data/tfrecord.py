"""TFRecord files and ``tf.train.Example`` records, without TensorFlow.

A TFRecord file is a sequence of records::

    uint64 length (little endian) | uint32 masked CRC32C(length bytes) | data | uint32 masked CRC32C(data)

with mask(c) = ((c >> 15) | (c << 17)) + 0xa282ead8 (mod 2**32). Both checksums are verified on read; a mismatch
or a truncated record raises :class:`TFRecordError` naming the file and byte offset.

``tf.train.Example`` is a small protobuf: Example{1: Features}; Features{1: map<string, Feature>};
Feature{1: BytesList | 2: FloatList | 3: Int64List}; each list holds field 1, repeated (packed or not).
The codec below reads both packed and unpacked lists and writes packed ones, as TensorFlow does.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import crc32c as _crc32c

from common.atomic import atomic_write_bytes

FeatureValue = list[bytes] | list[float] | list[int]
_MASK_DELTA = 0xA282EAD8


class TFRecordError(ValueError):
    """A corrupt or truncated TFRecord file; the message names the file and the byte offset."""


def masked_crc32c(data: bytes) -> int:
    crc = _crc32c.crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# ---------------------------------------------------------------------------------------------------------
# Record framing
# ---------------------------------------------------------------------------------------------------------


def _read_frame(f: BinaryIO, path: Path, offset: int) -> bytes | None:
    """The payload of the record at ``offset`` (``f`` positioned there), checksums verified; None at the end."""
    header = f.read(12)
    if not header:
        return None
    if len(header) < 12:
        raise TFRecordError(f"{path}: truncated record header at byte {offset}")
    (length,) = struct.unpack("<Q", header[:8])
    (length_crc,) = struct.unpack("<I", header[8:])
    if masked_crc32c(header[:8]) != length_crc:
        raise TFRecordError(f"{path}: length checksum mismatch at byte {offset}")
    data = f.read(length)
    footer = f.read(4)
    if len(data) < length or len(footer) < 4:
        raise TFRecordError(f"{path}: truncated record of {length} bytes at byte {offset}")
    if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
        raise TFRecordError(f"{path}: data checksum mismatch in the record at byte {offset}")
    return data


def iter_records(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield (byte offset, payload) of each record in file order, verifying the length and data checksums."""
    path = Path(path)
    with open(path, "rb") as f:
        offset = 0
        while (data := _read_frame(f, path, offset)) is not None:
            yield offset, data
            offset += 16 + len(data)


def read_records(path: str | Path) -> Iterator[bytes]:
    """Yield each record's payload, verifying the length and data checksums."""
    for _, data in iter_records(path):
        yield data


def read_record_at(path: str | Path, offset: int, handle: BinaryIO | None = None) -> bytes:
    """The payload of the one record that starts at byte ``offset`` (from :func:`iter_records`), verified.

    ``handle``: an open binary file of ``path`` to read from (saves an open per record); errors name ``path``.
    """
    path = Path(path)
    if handle is None:
        with open(path, "rb") as f:
            return read_record_at(path, offset, f)
    handle.seek(offset)
    data = _read_frame(handle, path, offset)
    if data is None:
        raise TFRecordError(f"{path}: no record at byte {offset}, the file ends at byte {handle.seek(0, 2)}")
    return data


def frame_record(data: bytes) -> bytes:
    """One record's bytes on disk."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def write_records(path: str | Path, records: Iterator[bytes] | list[bytes]) -> int:
    """Write payloads as a TFRecord file (through a temporary name and a rename); returns the count."""
    count = 0

    def frames() -> Iterator[bytes]:
        nonlocal count
        for data in records:
            yield frame_record(data)
            count += 1

    atomic_write_bytes(path, frames())
    return count


# ---------------------------------------------------------------------------------------------------------
# Protobuf wire format (just what tf.train.Example needs)
# ---------------------------------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(buf: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """Yield (field number, wire type, value) of a message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + n], pos + n
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated protobuf field")
        yield field, wire, value


def _decode_feature(buf: bytes) -> FeatureValue:
    for kind, _, payload in _fields(buf):
        values: list = []
        for _, wire, v in _fields(payload):  # type: ignore[arg-type]
            if kind == 1:
                values.append(bytes(v))  # type: ignore[arg-type]
            elif kind == 2:
                values.extend(struct.unpack(f"<{len(v) // 4}f", v) if wire == 2 else struct.unpack("<f", v))
            elif kind == 3:
                if wire == 2:
                    pos = 0
                    while pos < len(v):  # type: ignore[arg-type]
                        x, pos = _varint(v, pos)  # type: ignore[arg-type]
                        values.append(x - (1 << 64) if x >= 1 << 63 else x)
                else:
                    values.append(v - (1 << 64) if v >= 1 << 63 else v)  # type: ignore[operator]
        return values
    return []


def decode_example(data: bytes) -> dict[str, FeatureValue]:
    """``tf.train.Example`` bytes -> {feature name: list of bytes | float | int}."""
    out: dict[str, FeatureValue] = {}
    for field, _, features in _fields(data):
        if field != 1:
            continue
        for entry_field, _, entry in _fields(features):  # type: ignore[arg-type]
            if entry_field != 1:
                continue
            key, value = "", b""
            for f, _, v in _fields(entry):  # type: ignore[arg-type]
                if f == 1:
                    key = bytes(v).decode("utf-8")  # type: ignore[arg-type]
                elif f == 2:
                    value = v  # type: ignore[assignment]
            out[key] = _decode_feature(value)  # type: ignore[arg-type]
    return out


def _enc_varint(x: int) -> bytes:
    x &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = x & 0x7F
        x >>= 7
        out.append(b | (0x80 if x else 0))
        if not x:
            return bytes(out)


def _enc_field(field: int, payload: bytes) -> bytes:
    return _enc_varint(field << 3 | 2) + _enc_varint(len(payload)) + payload


def encode_example(features: dict[str, FeatureValue]) -> bytes:
    """{name: list of bytes | float | int} -> ``tf.train.Example`` bytes (lists typed by their first item;
    an empty list is written as an empty bytes list)."""
    entries = b""
    for name, values in features.items():
        values = list(values)
        if not values or isinstance(values[0], (bytes, bytearray)):
            kind, body = 1, b"".join(_enc_field(1, bytes(v)) for v in values)
        elif isinstance(values[0], float):
            kind, body = 2, _enc_field(1, struct.pack(f"<{len(values)}f", *values))
        elif isinstance(values[0], int):
            kind, body = 3, _enc_field(1, b"".join(_enc_varint(int(v)) for v in values))
        else:
            raise TypeError(f"feature {name!r}: values must be bytes, float or int, got {type(values[0]).__name__}")
        entry = _enc_field(1, name.encode("utf-8")) + _enc_field(2, _enc_field(kind, body))
        entries += _enc_field(1, entry)
    return _enc_field(1, entries)
