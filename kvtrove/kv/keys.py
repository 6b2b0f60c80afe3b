"""Content addresses of KV chunks.

Exact-prefix blocks chain: h_i = xxh3_128(h_{i-1} || token ids of block i), h_{-1} = model fingerprint,
so a key names a block *and everything before it*. Segment windows (position-independent entries, for
blending) do not chain: s = xxh3_128("segment" || fingerprint || token ids of the window) names the
window's tokens alone, wherever they stood; the hashed input is 7 bytes longer than a chained block's of the same
length, so the two kinds of key never come from the same bytes.

A request with a cache salt (a tenant) replaces the fingerprint in both by its salted root
r = xxh3_128("salt" || fingerprint || salt): its keys share nothing with other salts' or unsalted
ones, so tenants can neither reuse nor probe (by timing) each other's cached text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import xxhash


def block_key(parent: bytes, token_ids: Sequence[int]) -> bytes:
    return xxhash.xxh3_128_digest(parent + np.asarray(token_ids, dtype="<i4").tobytes())


def chain_keys(parent: bytes, token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """Keys of every full block of `token_ids`, chained from `parent`."""
    keys = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = block_key(parent, token_ids[start : start + block_size])
        keys.append(parent)
    return keys


def salted_root(fingerprint: bytes, salt: str | None) -> bytes:
    """The root that a request's keys chain from: the model fingerprint, or with a cache salt the salted root."""
    return fingerprint if salt is None else xxhash.xxh3_128_digest(b"salt" + fingerprint + salt.encode())


def segment_key(fingerprint: bytes, token_ids: Sequence[int]) -> bytes:
    return xxhash.xxh3_128_digest(b"segment" + fingerprint + np.asarray(token_ids, dtype="<i4").tobytes())
