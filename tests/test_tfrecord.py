"""TFRecord framing and tf.train.Example coding, checked against known bytes and by corrupting files."""

from __future__ import annotations

import struct

import pytest

from rahf.data.tfrecord import (
    TFRecordError,
    decode_example,
    encode_example,
    frame_record,
    masked_crc32c,
    read_records,
    write_records,
)


def test_crc32c_known_answer_and_mask():
    import crc32c

    assert crc32c.crc32c(b"123456789") == 0xE3069283
    crc = 0xE3069283
    assert masked_crc32c(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_example_bytes_match_the_protobuf_encoding():
    # Example{features{feature{key:"a" value{int64_list{value:[1]}}}}}, as TensorFlow serialises it.
    expected = bytes.fromhex("0a0c0a0a0a0161120 51a030a0101".replace(" ", ""))
    assert encode_example({"a": [1]}) == expected
    assert decode_example(expected) == {"a": [1]}


def test_unpacked_lists_decode_too():
    # FloatList with two unpacked floats (wire type 5) and Int64List with unpacked varints (wire type 0).
    floats = b"\x0d" + struct.pack("<f", 0.5) + b"\x0d" + struct.pack("<f", -2.0)
    ints = b"\x08\x07\x08" + bytes([0xFF] * 9) + b"\x01"  # 7 and -1
    feature_f = b"\x12" + bytes([len(floats)]) + floats
    feature_i = b"\x1a" + bytes([len(ints)]) + ints

    def entry(key: bytes, feature: bytes) -> bytes:
        body = b"\x0a" + bytes([len(key)]) + key + b"\x12" + bytes([len(feature)]) + feature
        return b"\x0a" + bytes([len(body)]) + body

    features = entry(b"f", feature_f) + entry(b"i", feature_i)
    example = b"\x0a" + bytes([len(features)]) + features
    assert decode_example(example) == {"f": [0.5, -2.0], "i": [7, -1]}


def test_round_trip_of_richhf_like_features():
    png = bytes(range(256)) * 40
    features = {
        "filename": [b"train/0a1b.png"],
        "artifact_score": [0.75],
        "artifact_map": [png],
        "prompt_misalignment_label": [b"1 0 1 1"],
        "counts": [0, -5, 2**40],
        "empty": [],
    }
    decoded = decode_example(encode_example(features))
    assert decoded == {**features, "empty": []}


def test_framing_round_trip_and_corruption_is_located(tmp_path):
    path = tmp_path / "data.tfrecord"
    payloads = [b"first", b"second record", b""]
    assert write_records(path, payloads) == 3
    assert list(read_records(path)) == payloads
    raw = bytearray(path.read_bytes())
    second = len(frame_record(b"first"))
    damaged = bytearray(raw)
    damaged[second + 12 + 2] ^= 0xFF  # a data byte of the second record
    (tmp_path / "d.tfrecord").write_bytes(bytes(damaged))
    with pytest.raises(TFRecordError, match=rf"d\.tfrecord: data checksum mismatch .* byte {second}"):
        list(read_records(tmp_path / "d.tfrecord"))
    damaged = bytearray(raw)
    damaged[second] ^= 0x01  # the second record's length
    (tmp_path / "l.tfrecord").write_bytes(bytes(damaged))
    with pytest.raises(TFRecordError, match=rf"length checksum mismatch at byte {second}"):
        list(read_records(tmp_path / "l.tfrecord"))
    (tmp_path / "t.tfrecord").write_bytes(bytes(raw[: second + 10]))
    with pytest.raises(TFRecordError, match=rf"truncated record header at byte {second}"):
        list(read_records(tmp_path / "t.tfrecord"))
    (tmp_path / "t2.tfrecord").write_bytes(bytes(raw[: second + 15]))
    with pytest.raises(TFRecordError, match="truncated record of 13 bytes"):
        list(read_records(tmp_path / "t2.tfrecord"))


def test_bad_feature_types_rejected():
    with pytest.raises(TypeError, match="feature 'x'"):
        encode_example({"x": [object()]})  # type: ignore[list-item]
