"""GGUF 4-bit blocks repacked into our int4 layout and Q8_0 blocks into our int8 one: bit-exact against the
`gguf` package's dequantization, on synthetic blocks of each type and on every layer of the default model's
file (Q4_1 layers, a Q8_0 embedding that is also the output head)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import quants

from kvtrove import LLM
from kvtrove.layers.kernels import cpu_kernels
from kvtrove.layers.linear import CpuLinear
from kvtrove.layers.quant import Int4Linear, Int8Linear
from kvtrove.loader.gguf_repack import repack, repack_int8


def _blocks(qtype: Q, rows: int, cols: int) -> np.ndarray:
    rng = np.random.default_rng(int(qtype))
    if qtype in (Q.Q4_0, Q.Q4_1):  # the package quantizes these itself
        return quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), qtype)
    # Q4_K: any bytes are valid blocks once d and dmin are sane float16 numbers
    raw = rng.integers(0, 256, (rows, cols // 256 * 144), dtype=np.uint8)
    blocks = raw.reshape(rows, -1, 144)
    for at in (0, 2):
        scale = rng.uniform(1e-3, 1e-2, blocks.shape[:2]).astype(np.float16)
        blocks[..., at : at + 2] = scale.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return raw


@pytest.mark.parametrize("kernels", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q4_K])
def test_repacked_blocks_dequantize_exactly_like_gguf(qtype, kernels):
    raw = _blocks(qtype, 96, 512)
    want = torch.from_numpy(quants.dequantize(raw, qtype))
    layer = Int4Linear(None, None, kernels=cpu_kernels() if kernels else None, parts=repack(raw, qtype))
    assert layer.in_features == 512 and layer.out_features == 96
    assert torch.equal(layer.dequantized(), want)  # bit for bit: fp16 scales times small ints are exact in float32


@pytest.mark.parametrize("kernels", [True, False], ids=["cpp", "torch"])
def test_q8_0_blocks_dequantize_exactly_like_gguf(kernels):
    rng = np.random.default_rng(8)
    raw = quants.quantize(rng.standard_normal((96, 512)).astype(np.float32), Q.Q8_0)
    want = torch.from_numpy(quants.dequantize(raw, Q.Q8_0))
    layer = Int8Linear(None, None, kernels=cpu_kernels() if kernels else None, parts=repack_int8(raw, Q.Q8_0))
    assert layer.in_features == 512 and layer.out_features == 96
    assert torch.equal(layer.dequantized(), want)
    x = torch.randn(5, 512)
    torch.testing.assert_close(layer(x).double(), x.double() @ want.double().t(), rtol=1e-5, atol=1e-4)


def test_types_without_an_exact_form_are_refused():
    raw = quants.quantize(np.ones((4, 64), dtype=np.float32), Q.Q8_0)
    with pytest.raises(ValueError, match="no exact int4 form"):
        repack(raw, Q.Q8_0)
    with pytest.raises(ValueError, match="no exact int8 form"):
        repack_int8(quants.quantize(np.ones((4, 64), dtype=np.float32), Q.Q4_1), Q.Q4_1)


def test_default_model_runs_its_own_4_bit_weights(smollm_path):
    """`quantize="auto"` (the default) on the Q4_1 file: every linear layer is int4 holding exactly the file's
    weights (those the float model dequantizes, q/k rows un-permuted); the tied output head, stored as Q8_0,
    is int8 holding exactly the file's Q8_0 weights too."""
    auto = LLM(model=smollm_path, num_blocks=16, kv_host_gb=0, kv_disk_gb=0)
    plain = LLM(model=smollm_path, quantize="none", num_blocks=16, kv_host_gb=0, kv_disk_gb=0)
    floats = {n: m for n, m in plain.engine.model.named_modules() if isinstance(m, CpuLinear)}
    int4 = {n: m for n, m in auto.engine.model.named_modules() if isinstance(m, Int4Linear)}
    assert len(int4) == 30 * 4  # qkv, o, gate_up, down in each of 30 layers
    for name, layer in int4.items():
        assert torch.equal(layer.dequantized(), floats[name].weight), name
    head = auto.engine.model.lm_head
    assert isinstance(head, Int8Linear)
    assert torch.equal(head.dequantized(), floats["lm_head"].weight)
    assert {p.impl for p in auto.engine.placement if p.kind == "linear"} == {"int4", "int8"}
    assert auto.engine.fingerprint != plain.engine.fingerprint
