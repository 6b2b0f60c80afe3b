"""Content addresses of KV blocks: h_i = xxh3_128(h_{i-1} || token ids of block i), h_{-1} = model fingerprint."""

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
