"""Weight-only quantized linear layers for the CPU, and the module swap that installs them.

Decode reads every weight once per token, so fewer bytes per weight is more tokens per second.
- `int8`: one int8 per weight and a float32 scale per 32 along the input (symmetric, round to nearest):
  GGUF's Q8_0 blocks exactly, or any float weight quantized so.
- `int4`: 4 bits per weight in groups of `group_size` along the input, a float32 scale and minimum per
  group (w = q * scale + min rounded once, q in 0..15; GGUF Q4_0 / Q4_1 / Q4_K blocks map onto it
  exactly).
Both run kvtrove's C++ kernel (`csrc/quant_linear.cpp`) for every step: the weights expanded to float32
as stored and float32 activations, each output in one fixed summation order, so a token's numbers are
the same in a decode step, a batch or any prefill chunk, and a GGUF's weights are used as the file has
them (the default engine keeps the float model's answers). Without the kernels: the weight dequantized
per call and torch's F.linear.
The kernel reads the weights packed once at load (`pack_int8` / `pack_int4`): panels of 8 rows, per group
of 32 along the input one block of the 8 rows' values and their scales (and mins), so a decode step
streams each panel sequentially with every row at a fixed offset.
PyTorch's kernels were measured first: `_weight_int4pack_mm_for_cpu` streams only 4.6-6.4 GB/s of
weights on AVX2 machines (compute-bound), and `_weight_int8pack_mm` is fast only with bf16 activations
and returns bf16, which rounds an output head's logits to 8 bits of mantissa, differently per batch
size.
Model files stay free of quantization code: placement (`kvtrove.placement`) swaps these in after loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvtrove.config import GROUP_SIZES
from kvtrove.config import QUANT_SCHEMES as SCHEMES
from kvtrove.layers.activation import SiluAndMul


def int8_parts(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, k] float -> (qweight [n, k] int8, scales [n, ceil(k/32)] float32): per 32 along the input,
    scale = max|w| / 127 and q = round(w / scale) (Q8_0's rule)."""
    n, k = weight.shape
    groups = -(-k // 32)
    w = F.pad(weight.float(), (0, groups * 32 - k)).view(n, groups, 32)
    scale = w.abs().amax(-1) / 127
    q = torch.where(scale[..., None] > 0, w / scale[..., None], torch.zeros_like(w)).round().clamp(-127, 127)
    return q.to(torch.int8).view(n, -1)[:, :k].contiguous(), scale.contiguous()


PANEL = 8
"""Rows per panel of the packed layouts (`csrc/quant_linear.cpp`); rows past N are zero."""


def _bytes(t: torch.Tensor, groups: int) -> torch.Tensor:
    """float32 [n, groups] -> their bytes [n, groups, 4] (uint8)."""
    return t.contiguous().view(torch.uint8).view(t.shape[0], groups, 4)


def _panels(blocks: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row blocks [n, groups, b] (uint8) -> [P, groups, 8 * b]: each panel's 8 rows side by side."""
    p = -(-n // PANEL)
    blocks = F.pad(blocks, (0, 0, 0, 0, 0, PANEL * p - n))
    groups, b = blocks.shape[1:]
    return blocks.view(p, PANEL, groups, b).transpose(1, 2).reshape(p, groups, PANEL * b)


def _rows(packed: torch.Tensor, n: int, b: int) -> torch.Tensor:
    """`_panels` undone: [P, groups, 8 * b] -> [n, groups, b] (uint8, a copy)."""
    p, groups, _ = packed.shape
    return packed.view(torch.uint8).view(p, groups, PANEL, b).transpose(1, 2).reshape(p * PANEL, groups, b)[:n]


def pack_int8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """(qweight [n, k] int8, scales [n, ceil(k/32)] float32) -> int8 panels [ceil(n/8), ceil(k/32), 288]: per
    group, the 8 rows' 32 values (k padded with zeros), then their 8 scales."""
    n, k = qweight.shape
    groups = -(-k // 32)
    q = F.pad(qweight, (0, 32 * groups - k)).view(torch.uint8).view(n, groups, 32)
    parts = [_panels(q, n), _panels(_bytes(scales, groups), n)]
    return torch.cat(parts, -1).view(torch.int8)


def unpack_int8(packed: torch.Tensor, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack_int8` undone: (qweight [n, k] int8, scales [n, ceil(k/32)] float32), copies."""
    groups = packed.shape[1]
    q = _rows(packed[..., : PANEL * 32], n, 32).reshape(n, groups * 32)[:, :k].view(torch.int8)
    scales = _rows(packed[..., PANEL * 32 :], n, 4).reshape(n, groups * 4).view(torch.float32)
    return q.contiguous(), scales.contiguous()


def pack_int4(qweight: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """(qweight [n, k/2] uint8, scales and mins [n, k/32] float32) -> uint8 panels [ceil(n/8), k/32, 192]: per
    group, the 8 rows' 16 bytes, then their 8 scales, then their 8 mins."""
    n, groups = scales.shape
    parts = [_panels(qweight.reshape(n, groups, 16), n), _panels(_bytes(scales, groups), n), _panels(_bytes(mins, groups), n)]
    return torch.cat(parts, -1)


def unpack_int4(packed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pack_int4` undone: (qweight [n, k/2] uint8, scales, mins [n, k/32] float32), copies."""
    groups = packed.shape[1]
    q = _rows(packed[..., : PANEL * 16], n, 16).reshape(n, groups * 16)
    scales = _rows(packed[..., PANEL * 16 : PANEL * 20], n, 4).reshape(n, groups * 4).view(torch.float32)
    mins = _rows(packed[..., PANEL * 20 :], n, 4).reshape(n, groups * 4).view(torch.float32)
    return q.contiguous(), scales.contiguous(), mins.contiguous()


class Int8Linear(nn.Module):
    """8-bit weights with a float32 scale per 32 along the input: w = q * scale."""

    def __init__(
        self,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        kernels=None,
        parts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ):
        """Quantizes `weight` [n, k]; or takes `parts` (qweight, scales) already in this layout (GGUF Q8_0
        blocks) and no weight. With `kernels`, keeps them packed (`pack_int8`) only."""
        super().__init__()
        qweight, scales = parts if parts is not None else int8_parts(weight)
        self.out_features, self.in_features = qweight.shape
        self.bias = None if bias is None else bias.float()
        self.kernels = kernels
        self.packed = None if kernels is None else pack_int8(qweight, scales)
        self._parts = (qweight.contiguous(), scales.contiguous()) if kernels is None else None

    def parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(qweight [n, k] int8, scales [n, ceil(k/32)] float32) (unpacked: copies, where the kernel holds them)."""
        if self._parts is not None:
            return self._parts
        return unpack_int8(self.packed, self.out_features, self.in_features)

    def dequantized(self) -> torch.Tensor:
        qweight, scales = self.parts()
        return qweight.float() * scales.repeat_interleave(32, 1)[:, : self.in_features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if self.kernels is not None:
            y = self.kernels.q8_linear(x2, self.packed, self.out_features)
        else:
            y = F.linear(x2.float(), self.dequantized())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


def int4_parts(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[n, k] float -> (qweight [n, k/2] uint8, scales and mins [n, k/32] float32): round to nearest between
    each group's min and max; the kernel's unit is 32 weights, byte j of a unit holding weights j (low
    nibble) and j + 16 (high), with the group's scale and min repeated per 32."""
    n, k = weight.shape
    if group_size not in GROUP_SIZES:
        raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    if k % group_size:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of the group size ({group_size})")
    w = weight.float().view(n, k // group_size, group_size)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = ((w - lo) / scale).round().clamp(0, 15).to(torch.uint8).view(n, k // 32, 32)
    per32 = group_size // 32
    return (
        (q[..., :16] | (q[..., 16:] << 4)).reshape(n, k // 2),
        scale.view(n, -1).repeat_interleave(per32, 1),
        lo.view(n, -1).repeat_interleave(per32, 1),
    )


class Int4Linear(nn.Module):
    """4-bit weights in groups along the input: w = q * scale + min, q in 0..15 (round to nearest between
    the group's min and max)."""

    def __init__(
        self,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        group_size: int = 32,
        kernels=None,
        parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ):
        """Quantizes `weight` [n, k]; or takes `parts` (qweight, scales, mins) already in this layout (GGUF 4-bit
        blocks repacked) and no weight. With `kernels`, keeps them packed (`pack_int4`) only."""
        super().__init__()
        qweight, scales, mins = parts if parts is not None else int4_parts(weight, group_size)
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.bias = None if bias is None else bias.float()
        self.kernels = kernels
        self.packed = None if kernels is None else pack_int4(qweight, scales, mins)
        self._parts = None if kernels is not None else tuple(t.contiguous() for t in (qweight, scales, mins))

    def parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(qweight [n, k/2] uint8, scales, mins [n, k/32] float32) (unpacked: copies, where the kernel holds
        them)."""
        if self._parts is not None:
            return self._parts
        return unpack_int4(self.packed, self.out_features)

    def dequantized(self) -> torch.Tensor:
        """w = q * scale + min rounded once, as the kernel expands it (q * scale is exact in float64)."""
        n, k = self.out_features, self.in_features
        qweight, scales, mins = self.parts()
        packed = qweight.view(n, k // 32, 16)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).view(n, k // 32, 32).double()
        return (q * scales[..., None].double() + mins[..., None].double()).float().view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None and self.kernels is not None and x.dim() == 2:  # the common case, lean
            return self.kernels.q4_linear(x, self.packed, self.out_features).to(x.dtype)
        x2 = x.reshape(-1, self.in_features)
        if self.kernels is not None:
            y = self.kernels.q4_linear(x2, self.packed, self.out_features)
        else:
            y = F.linear(x2.float(), self.dequantized())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*x.shape[:-1], self.out_features)


class QuantizedExperts(nn.Module):
    """A MoE layer's stacked experts (`models.moe.Experts`), each projection quantized on its own."""

    def __init__(self, experts: nn.Module, scheme: str, group_size: int, kernels=None):
        super().__init__()
        self.num_experts, self.top_k = experts.w13.shape[0], experts.top_k
        self.w13 = nn.ModuleList(quantized(w.detach(), None, scheme, group_size, kernels) for w in experts.w13)
        self.w2 = nn.ModuleList(quantized(w.detach(), None, scheme, group_size, kernels) for w in experts.w2)
        self.act = SiluAndMul()
        self.act.kernels = kernels
        self.layers = list(zip(self.w13, self.w2))
        """(gate/up, down) per expert as a plain list: ModuleList indexing costs microseconds per call."""
        self.bank = self._bank(kernels)
        """A decode token's experts in one C++ call (`csrc/expert_bank.h`): the same numbers as `expert`
        and the same summation order, without ~5 Python calls per expert; None where the kernels do not
        run (no compiler)."""

    def _bank(self, kernels):
        layers = [m for pair in self.layers for m in pair]
        if kernels is None or any(m.bias is not None or m.kernels is None for m in layers):
            return None
        w13, w2 = self.layers[0]
        bank = kernels.ExpertBank(w13.out_features, w2.out_features)
        for w13, w2 in self.layers:
            bank.add(w13.packed, w2.packed)
        return bank

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.layers[e]
        return w2(self.act(w13(x)))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        from kvtrove.models.moe import run_grouped

        if self.bank is not None and x.shape[0] == 1 and x.dtype == torch.float32:
            return self.bank.forward(x, chosen[0].tolist(), weights[0])
        return run_grouped(self.expert, self.num_experts, x, weights, chosen)


def quantized_bytes(n: int, k: int, scheme: str) -> int:
    """Bytes of an [n, k] weight in `scheme` (int8: a byte per weight + a float32 scale per 32; int4: half a
    byte per weight + a float32 scale and minimum per 32)."""
    return n * k + 4 * n * -(-k // 32) if scheme == "int8" else n * k // 2 + 8 * (n * k // 32)


def quantized(
    weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, group_size: int = 32, kernels=None
) -> nn.Module:
    if scheme == "int8":
        return Int8Linear(weight, bias, kernels)
    if scheme == "int4":
        return Int4Linear(weight, bias, group_size, kernels)
    raise ValueError(f"quantize must be one of {SCHEMES}, got {scheme!r}")
