"""Weight-only quantized linear layers for the CPU, and the module swap that installs them.

Decode reads every weight once per token, so fewer bytes per weight is more tokens per second.
- `int8`: one int8 per weight, a float32 scale per output channel (symmetric, round to nearest).
- `int4`: 4 bits per weight in groups of `group_size` along the input, a float32 scale and minimum per
  group (w ~ q * scale + min, q in 0..15; GGUF Q4_0 / Q4_1 / Q4_K blocks map onto it exactly).
Both run kvtrove's C++ kernels (`csrc/quant_linear.cpp`) for few tokens, with activations rounded to
int16 per 32 (the float result to ~1e-5), and for prefill a float GEMM on the weight dequantized per
call, fed the same rounded activations (so a token's numbers do not depend on the step it is in).
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

FEW_TOKENS = 16
"""Up to this many tokens the kernels; beyond, the weight dequantized per call and a float GEMM."""


def round_like_kernels(x: torch.Tensor, kernels=None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] float32 rounded as the kernels round activations (int16 per 32, scale max|x| / 32767), and
    per group of 32 what the rounding lost from the sum ([T, K/32]; the int4 kernel applies each group's
    min to the exact sum). Prefill GEMMs take the same rounded activations, so a token's numbers do not
    depend on whether it is computed in a decode step or a prefill (only on summation order, ~1e-7).
    With the kernels, one C++ pass (`round_activations`, the decode kernels' own rounding code); the torch
    ops below differ from it by one int16 unit on ~1% of values (the C++, built with fast math, takes a
    slightly different reciprocal of the scale)."""
    if kernels is not None:
        return tuple(kernels.round_activations(x))
    T, K = x.shape
    g = x.view(T, K // 32, 32)
    d = g.abs().amax(-1, keepdim=True) / 32767
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    rounded = (g * inv).round_().mul_(d)
    return rounded.view(T, K), g.sum(-1) - rounded.sum(-1)


class Int8Linear(nn.Module):
    """8-bit weights, a float32 scale per output row (symmetric, round to nearest). Few tokens run
    kvtrove's C++ kernel (int16 activations: the float result to ~1e-5); more tokens, or no kernel, the
    weight dequantized per call with a float GEMM."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels=None):
        super().__init__()
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scales", scale.contiguous())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.kernels = kernels
        self.out_features, self.in_features = weight.shape

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if self.kernels is not None and x2.shape[0] <= FEW_TOKENS and self.in_features % 32 == 0:
            y = self.kernels.q8_linear(x2, self.qweight, self.scales)
        else:
            rounded = round_like_kernels(x2, self.kernels)[0] if self.in_features % 32 == 0 else x2  # (no kernel)
            y = F.linear(rounded, self.dequantized())
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
    """4-bit weights in groups along the input: w ~ q * scale + min, q in 0..15 (round to nearest between
    the group's min and max). Runs on kvtrove's C++ kernel (`csrc/q4_linear.cpp`, scales kept in
    float32, activations rounded to int16: the float result to ~1e-5) for few tokens; prefill steps and
    machines without the kernel use the weight dequantized per call with a float GEMM."""

    def __init__(
        self,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        group_size: int = 32,
        kernels=None,
        parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    ):
        """Quantizes `weight` [n, k]; or takes `parts` (qweight, scales, mins) already in this layout (GGUF
        4-bit blocks repacked) and no weight."""
        super().__init__()
        qweight, scales, mins = parts if parts is not None else int4_parts(weight, group_size)
        self.register_buffer("qweight", qweight.contiguous())
        self.register_buffer("scales", scales.contiguous())
        self.register_buffer("mins", mins.contiguous())
        self.register_buffer("bias", None if bias is None else bias.float())
        self.kernels = kernels
        self.out_features, self.in_features = qweight.shape[0], qweight.shape[1] * 2
        self.fast = (self.qweight, self.scales, self.mins) if self.bias is None else None
        """The kernel's arguments as a plain attribute (buffers are looked up through nn.Module's slow
        __getattr__, ~1 us each, on the 120 calls of a decode step)."""

    def dequantized(self) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.q4_dequantize(self.qweight, self.scales, self.mins)
        n, k = self.out_features, self.in_features
        packed = self.qweight.view(n, k // 32, 16)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).view(n, k // 32, 32).float()
        return (q * self.scales[..., None] + self.mins[..., None]).view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lean = self.fast is not None and self.kernels is not None and x.dim() == 2 and x.dtype == torch.float32
        if lean and x.shape[0] <= FEW_TOKENS:  # decode, with the least Python
            return self.kernels.q4_linear(x, *self.fast)
        x2 = x.reshape(-1, self.in_features).float()
        if self.kernels is not None and x2.shape[0] <= FEW_TOKENS:  # decode: bound by reading the weights
            y = self.kernels.q4_linear(x2, self.qweight, self.scales, self.mins)
        else:  # prefill: bound by arithmetic, which a float GEMM does best
            rounded, lost = round_like_kernels(x2, self.kernels)
            y = F.linear(rounded, self.dequantized()).addmm_(lost, self.mins.t())
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
        run (no compiler, or int8 rows not in groups of 32)."""

    def _bank(self, kernels):
        layers = [m for pair in self.layers for m in pair]
        if kernels is None or any(m.bias is not None or m.in_features % 32 for m in layers):
            return None
        bank = kernels.ExpertBank()
        for w13, w2 in self.layers:
            bank.add(*(kernel_parts(m) for m in (w13, w2)))
        return bank

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        w13, w2 = self.layers[e]
        return w2(self.act(w13(x)))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        from kvtrove.models.moe import run_grouped

        if self.bank is not None and x.shape[0] == 1 and x.dtype == torch.float32:
            return self.bank.forward(x, chosen[0].tolist(), weights[0])
        return run_grouped(self.expert, self.num_experts, x, weights, chosen)


def kernel_parts(m: Int8Linear | Int4Linear) -> list[torch.Tensor]:
    """The tensors the C++ kernels take for a quantized layer: int8 (qweight, scales), int4 (.., mins)."""
    return [m.qweight, m.scales, m.mins] if isinstance(m, Int4Linear) else [m.qweight, m.scales]


def quantized_bytes(n: int, k: int, scheme: str) -> int:
    """Bytes of an [n, k] weight in `scheme` (int8: weights + a float32 scale per row; int4: half a byte per
    weight + a float32 scale and minimum per 32)."""
    return n * k + 4 * n if scheme == "int8" else n * k // 2 + 8 * (n * k // 32)


def quantized(
    weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, group_size: int = 32, kernels=None
) -> nn.Module:
    if scheme == "int8":
        return Int8Linear(weight, bias, kernels)
    if scheme == "int4":
        return Int4Linear(weight, bias, group_size, kernels)
    raise ValueError(f"quantize must be one of {SCHEMES}, got {scheme!r}")
