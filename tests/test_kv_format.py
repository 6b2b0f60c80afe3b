"""The stored chunk format: round trip, and every kind of bad chunk is refused with its reason."""

from __future__ import annotations

import json

import pytest
import torch
import xxhash

from kvtrove.kv.format import _PREFIX, MAGIC, ChunkError, ChunkHeader, decode, encode

FP = b"\x01" * 16


def _chunk(dtype=torch.float32, key=b"k" * 16, tokens=4):
    kv = torch.randn(3, 2, 2, tokens, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    header = ChunkHeader(
        key=key,
        parent=b"p" * 16,
        fingerprint=FP,
        dtype=str(dtype).removeprefix("torch."),
        shape=tuple(kv.shape),
        token_ids=tuple(range(100, 100 + tokens)),
    )
    return header, kv, encode(header, kv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(dtype):
    header, kv, data = _chunk(dtype)
    got_header, got = decode(data, header.key, FP, dtype)
    assert got_header == header
    assert got.dtype == dtype and torch.equal(got, kv)


def test_position_round_trips_and_older_chunks_have_none():
    header, kv, _ = _chunk()
    placed = ChunkHeader(**{**header.__dict__, "position": 48})
    assert decode(encode(placed, kv), header.key, FP, torch.float32)[0].position == 48
    assert decode(encode(header, kv), header.key, FP, torch.float32)[0].position is None  # written without one
    bad = ChunkHeader(**{**header.__dict__, "position": -3})
    assert _reason(bytes(encode(bad, kv))) == "header"


def _reason(data: bytes, key=b"k" * 16, fp=FP, dtype=torch.float32) -> str:
    with pytest.raises(ChunkError) as e:
        decode(data, key, fp, dtype)
    return e.value.reason


def _resealed(body: bytes) -> bytes:
    """A chunk whose checksum is valid for deliberately wrong contents (what a buggy or hostile writer makes)."""
    return body + xxhash.xxh3_128_digest(body)


def test_every_bad_chunk_is_refused():
    header, _, data = _chunk()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x40
    assert _reason(bytes(flipped)) == "checksum"
    assert _reason(data[: len(data) - 100]) == "checksum"
    assert _reason(data[:10]) == "truncated"
    assert _reason(b"") == "truncated"
    assert _reason(data, key=b"x" * 16) == "key"  # a valid chunk stored under another key (swapped files)
    assert _reason(data, fp=b"\x02" * 16) == "foreign"  # another model
    assert _reason(data, dtype=torch.bfloat16) == "foreign"  # another dtype
    assert _reason(_resealed(b"NOPE" + data[4:-16])) == "magic"
    assert _reason(_resealed(_PREFIX.pack(MAGIC, 99, 0))) == "version"
    garbage = b"{not json"
    assert _reason(_resealed(_PREFIX.pack(MAGIC, 1, len(garbage)) + garbage)) == "header"
    # a header that lies about the payload size
    meta = json.loads(data[_PREFIX.size : _PREFIX.size + _PREFIX.unpack_from(data)[2]])
    meta["shape"][3] = 5
    meta["token_ids"].append(7)
    m = json.dumps(meta).encode()
    body = _PREFIX.pack(MAGIC, 1, len(m)) + m + data[_PREFIX.size + _PREFIX.unpack_from(data)[2] : -16]
    assert _reason(_resealed(body)) == "truncated"
    # a header whose shape and token count disagree
    meta["shape"][3] = 4
    m = json.dumps(meta).encode()
    assert _reason(_resealed(_PREFIX.pack(MAGIC, 1, len(m)) + m)) == "shape"


def test_encode_checks_its_input():
    header, kv, _ = _chunk()
    with pytest.raises(ValueError, match="does not match"):
        encode(header, kv.to(torch.bfloat16))
    with pytest.raises(ValueError, match="token ids"):
        encode(ChunkHeader(**{**header.__dict__, "token_ids": (1, 2)}), kv)
