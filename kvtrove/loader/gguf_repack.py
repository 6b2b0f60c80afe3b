"""GGUF 4-bit blocks -> kvtrove's int4 layout, and Q8_0 blocks -> its int8 one, by integer bit moves only
(no float round trip).

Our int4 weight (`layers.quant.Int4Linear`) is, per 32 weights along a row, 16 bytes (byte j: weight j
in the low nibble, weight j + 16 in the high one), a float32 scale and a float32 minimum:
w = q * scale + min.
- Q4_0 (per 32: fp16 d, 16 bytes): w = (q - 8) * d -> scale d, min -8d. The nibbles are already ours.
- Q4_1 (per 32: fp16 d, fp16 m, 16 bytes): w = q * d + m -> scale d, min m. Same nibbles.
- Q4_K (per 256: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128
  bytes): w = q * (d * sc) - dmin * m -> scale d*sc, min -dmin*m per sub-block; each 32 bytes hold two
  sub-blocks (low nibbles, then high), which we re-pair.
fp16 values times 6-bit integers are exact in float32, so `q * scale + min` reproduces the `gguf`
package's dequantization bit for bit.
Our int8 weight (`layers.quant.Int8Linear`) is an int8 per weight and a float32 scale per 32: Q8_0 (per
32: fp16 d, 32 int8) is exactly that, w = q * d. Other quantized types (Q6_K, Q5_*) have no exact form.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as Q

REPACKABLE = (Q.Q4_0, Q.Q4_1, Q.Q4_K)
"""Types with an exact int4 form."""
INT8_EXACT = (Q.Q8_0,)
"""Types with an exact int8 form."""


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] little-endian bytes -> float32 [...]."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _pair(q: np.ndarray) -> np.ndarray:
    """[..., 32] values 0..15 -> [..., 16] bytes: low nibble weight j, high nibble weight j + 16."""
    return q[..., :16] | (q[..., 16:] << 4)


def _k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes [..., 12] -> 6-bit scales and mins [..., 8] (sub-blocks 0-3 in the low 6 bits of bytes
    0-3 / 4-7; sub-blocks 4-7 from bytes 8-11's nibbles plus the top 2 bits of bytes 0-3 / 4-7)."""
    a, b, c = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return sc, mn


def repack(raw: np.ndarray, qtype: Q) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One weight's GGUF rows [n, bytes per row] (uint8) -> (qweight [n, k/2] uint8, scales and mins
    [n, k/32] float32) in our layout."""
    n = raw.shape[0]
    if qtype in (Q.Q4_0, Q.Q4_1):
        head = 2 if qtype == Q.Q4_0 else 4
        blocks = raw.reshape(n, -1, head + 16)
        qweight = blocks[..., head:]
        scales = _f16(blocks[..., 0:2])
        mins = -8 * scales if qtype == Q.Q4_0 else _f16(blocks[..., 2:4])
    elif qtype == Q.Q4_K:
        blocks = raw.reshape(n, -1, 144)
        d, dmin = _f16(blocks[..., 0:2])[..., None], _f16(blocks[..., 2:4])[..., None]
        sc, mn = _k_scales(blocks[..., 4:16])
        scales, mins = d * sc.astype(np.float32), -(dmin * mn.astype(np.float32))
        qs = blocks[..., 16:].reshape(n, -1, 4, 1, 32)  # 4 x 32 bytes, each two sub-blocks
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(n, -1, 8, 32)
        qweight = _pair(q)
    else:
        raise ValueError(f"GGUF type {qtype.name} has no exact int4 form; repackable: {[t.name for t in REPACKABLE]}")
    return (
        torch.from_numpy(np.ascontiguousarray(qweight).reshape(n, -1)),
        torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(n, -1)),
        torch.from_numpy(np.ascontiguousarray(mins, dtype=np.float32).reshape(n, -1)),
    )


def repack_int8(raw: np.ndarray, qtype: Q) -> tuple[torch.Tensor, torch.Tensor]:
    """One Q8_0 weight's GGUF rows [n, bytes per row] (uint8) -> (qweight [n, k] int8, scales [n, k/32]
    float32) in our layout."""
    if qtype not in INT8_EXACT:
        raise ValueError(f"GGUF type {qtype.name} has no exact int8 form; exact: {[t.name for t in INT8_EXACT]}")
    n = raw.shape[0]
    blocks = raw.reshape(n, -1, 34)
    qweight = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(n, -1)
    scales = _f16(blocks[..., 0:2]).reshape(n, -1)
    return torch.from_numpy(np.ascontiguousarray(qweight)), torch.from_numpy(np.ascontiguousarray(scales))
