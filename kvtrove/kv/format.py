"""The stored form of a KV chunk: a self-describing header, the raw tensor bytes, a checksum over both.

    "KVTC" | version u16 | header length u32 | header (JSON) | payload (raw KV) | xxh3-128 digest

Chunks come back from disk or from a pool shared with other engines, so they are untrusted: decoding
parses JSON and raw little-endian bytes only (never pickle or torch.load), and checks the checksum,
the key, the model fingerprint, the dtype, the shape and the payload size before a tensor is built.
The payload is [layers, parts, heads, tokens, dim] in the working dtype: parts are k and v with KV heads
and head dim for most models, one compressed latent (one "head") for DeepSeek's MLA.
"""

from __future__ import annotations

import json
import struct
import sys
import warnings
from dataclasses import dataclass

import torch
import xxhash

MAGIC = b"KVTC"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")
_DIGEST = 16
_MAX_HEADER = 1 << 20
PAYLOAD_ALIGN = 64
"""The payload starts at a multiple of this offset, so tensors viewed on it in place are aligned."""
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# decoded tensors view the stored bytes in place and are only ever read (copied into device blocks)
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


class ChunkError(ValueError):
    """A stored chunk that must not be used; `reason` names the check that failed (for counters)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"bad KV chunk ({reason}): {detail}")
        self.reason = reason


@dataclass(frozen=True)
class ChunkHeader:
    key: bytes
    parent: bytes
    fingerprint: bytes
    dtype: str
    shape: tuple[int, int, int, int, int]
    """[layers, 2, KV heads, tokens, head dim]"""
    token_ids: tuple[int, ...]
    position: int | None = None
    """Position of the first token when this KV was computed (RoPE was applied at position + i); None in
    chunks written before positions were recorded (an exact-prefix chunk's is its block's start)."""


def encode(header: ChunkHeader, kv: torch.Tensor) -> bytearray:
    """The chunk's bytes; `kv` (any layout, on the CPU) must match the header's shape and dtype."""
    if tuple(kv.shape) != header.shape or kv.dtype != DTYPES.get(header.dtype):
        raise ValueError(f"KV {tuple(kv.shape)} {kv.dtype} does not match the header {header.shape} {header.dtype}")
    if len(header.token_ids) != header.shape[3]:
        raise ValueError(f"{len(header.token_ids)} token ids for a chunk of {header.shape[3]} tokens")
    meta = json.dumps(
        {
            "key": header.key.hex(),
            "parent": header.parent.hex(),
            "fingerprint": header.fingerprint.hex(),
            "dtype": header.dtype,
            "shape": list(header.shape),
            "token_ids": list(header.token_ids),
            **({} if header.position is None else {"position": header.position}),
        },
        separators=(",", ":"),
    ).encode()
    meta += b" " * (-(_PREFIX.size + len(meta)) % PAYLOAD_ALIGN)  # JSON allows trailing blanks
    if sys.byteorder != "little":  # the format is little-endian; every platform torch ships on is
        raise RuntimeError("big-endian hosts are not supported")
    start = _PREFIX.size + len(meta)
    end = start + kv.numel() * kv.element_size()
    out = bytearray(end + _DIGEST)  # one buffer, filled in place: the KV is copied once
    _PREFIX.pack_into(out, 0, MAGIC, VERSION, len(meta))
    out[_PREFIX.size : start] = meta
    torch.frombuffer(out, dtype=torch.uint8, offset=start, count=end - start).view(kv.dtype).view(kv.shape).copy_(kv)
    body = memoryview(out)[:end]
    out[end:] = xxhash.xxh3_128_digest(body)
    body.release()
    return out


def decode(
    data: bytes,
    key: bytes,
    fingerprint: bytes,
    dtype: torch.dtype,
    shape: tuple[int, ...] | None = None,
    checksum: bool = True,
) -> tuple[ChunkHeader, torch.Tensor]:
    """Header and KV of a stored chunk expected under `key` for this model, dtype and (if given) shape;
    ChunkError if unusable.

    `checksum=False` skips the digest, for bytes that never left this process after being checked. The
    tensor shares `data`'s memory (no copy) and must not be written to."""
    view = memoryview(data)
    if len(view) < _PREFIX.size + _DIGEST:
        raise ChunkError("truncated", f"{len(view)} bytes")
    magic, version, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise ChunkError("magic", f"starts with {bytes(magic)!r}")
    if version != VERSION:
        raise ChunkError("version", f"format version {version}, this build reads {VERSION}")
    if hlen > _MAX_HEADER or _PREFIX.size + hlen + _DIGEST > len(view):
        raise ChunkError("truncated", f"header of {hlen} bytes in a {len(view)}-byte chunk")
    body = view[: len(view) - _DIGEST]
    if checksum and xxhash.xxh3_128_digest(body) != bytes(view[len(view) - _DIGEST :]):
        raise ChunkError("checksum", "the digest does not match the bytes")
    try:
        meta = json.loads(bytes(view[_PREFIX.size : _PREFIX.size + hlen]))
        header = ChunkHeader(
            key=bytes.fromhex(meta["key"]),
            parent=bytes.fromhex(meta["parent"]),
            fingerprint=bytes.fromhex(meta["fingerprint"]),
            dtype=str(meta["dtype"]),
            shape=tuple(int(d) for d in meta["shape"]),
            token_ids=tuple(int(t) for t in meta["token_ids"]),
            position=None if meta.get("position") is None else int(meta["position"]),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise ChunkError("header", f"unreadable header ({e})") from None
    if header.key != key:
        raise ChunkError("key", f"holds {header.key.hex()}, expected {key.hex()}")
    if header.fingerprint != fingerprint or DTYPES.get(header.dtype) != dtype:
        raise ChunkError("foreign", f"from another model or dtype ({header.dtype})")
    if shape is not None and header.shape != tuple(shape):
        raise ChunkError("shape", f"shape {header.shape}, expected {tuple(shape)}")
    shape = header.shape
    if header.position is not None and header.position < 0:
        raise ChunkError("header", f"position {header.position}")
    if len(shape) != 5 or min(shape) < 1 or len(header.token_ids) != shape[3]:
        raise ChunkError("shape", f"shape {shape} with {len(header.token_ids)} token ids")
    payload = body[_PREFIX.size + hlen :]
    expected = dtype.itemsize
    for d in shape:
        expected *= d
    if len(payload) != expected:
        raise ChunkError("truncated", f"payload of {len(payload)} bytes, shape {shape} needs {expected}")
    kv = torch.frombuffer(payload, dtype=torch.uint8).view(dtype).view(shape)
    return header, kv
