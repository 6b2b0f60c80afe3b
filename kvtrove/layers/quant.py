"""Weight-only quantized linear layers on PyTorch's CPU kernels, and the module swap that installs them.

Decode reads every weight once per token, so fewer bytes per weight is more tokens per second.
- `int8`: one int8 per weight, a scale per output channel (symmetric, round to nearest);
  `aten._weight_int8pack_mm`.
- `int4`: 4 bits per weight in groups of `group_size` along the input, a scale and an offset per
  group (asymmetric: w ~ (q - 8) * scale + zero, q in 0..15); `aten._weight_int4pack_mm_for_cpu`
  on the weight packed by `aten._convert_weight_to_int4pack_for_cpu`.
Both kernels are fast with bfloat16 activations and scales (15-25x slower with float32), so a layer
computes in bfloat16 and returns the caller's dtype. Model files stay free of quantization code:
`quantize_model` replaces their linear layers after loading.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvtrove.config import GROUP_SIZES
from kvtrove.config import QUANT_SCHEMES as SCHEMES
from kvtrove.layers.linear import CpuLinear

COMPUTE = torch.bfloat16


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        w = weight.float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("qweight", (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scales", scale.to(COMPUTE))
        self.register_buffer("bias", None if bias is None else bias.float())
        self.out_features, self.in_features = weight.shape

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(COMPUTE)
        y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group_size: int = 32):
        super().__init__()
        n, k = weight.shape
        if group_size not in GROUP_SIZES:
            raise ValueError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
        if k % group_size:
            raise ValueError(f"int4 needs the input size ({k}) to be a multiple of the group size ({group_size})")
        if n % 16:
            raise ValueError(f"int4 needs the output size ({n}) to be a multiple of 16 (the kernel's packing)")
        w = weight.float().view(n, k // group_size, group_size)
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / 15).clamp(min=1e-12)
        q = ((w - lo) / scale).round().clamp(0, 15).to(torch.int32).view(n, k)
        zero = lo + 8 * scale
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
        # [k / group, n, 2]: per group and output channel, (scale, zero)
        sz = torch.stack([scale.squeeze(-1), zero.squeeze(-1)], -1).transpose(0, 1)
        self.register_buffer("scales_and_zeros", sz.contiguous().to(COMPUTE))
        self.group_size = group_size
        self.register_buffer("bias", None if bias is None else bias.float())
        self.out_features, self.in_features = n, k

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel computes with (unpacked by multiplying the identity)."""
        eye = torch.eye(self.in_features, dtype=COMPUTE)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_and_zeros).t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(COMPUTE)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y.view(*x.shape[:-1], self.out_features)


class QuantizedExperts(nn.Module):
    """A MoE layer's stacked experts (`models.moe.Experts`), each projection quantized on its own."""

    def __init__(self, experts: nn.Module, scheme: str, group_size: int):
        super().__init__()
        self.num_experts, self.top_k = experts.w13.shape[0], experts.top_k
        self.w13 = nn.ModuleList(quantized(w.detach(), None, scheme, group_size) for w in experts.w13)
        self.w2 = nn.ModuleList(quantized(w.detach(), None, scheme, group_size) for w in experts.w2)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13[e](x).chunk(2, dim=-1)
        return self.w2[e](F.silu(gate) * up)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        from kvtrove.models.moe import run_grouped

        return run_grouped(self.expert, self.num_experts, x, weights, chosen)


def quantized(weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, group_size: int = 32) -> nn.Module:
    if scheme == "int8":
        return Int8Linear(weight, bias)
    if scheme == "int4":
        return Int4Linear(weight, bias, group_size)
    raise ValueError(f"quantize must be one of {SCHEMES}, got {scheme!r}")


def quantize_model(
    model: nn.Module,
    scheme: str,
    group_size: int = 32,
    int8_only: tuple[str, ...] = ("lm_head",),
    keep: tuple[str, ...] = ("gate", "shared_expert_gate"),
) -> int:
    """Replace every linear layer of `model` (plain or kvtrove's CPU ones) and every MoE layer's experts by
    their quantized form. Layers named in `int8_only` (the output head: every token's logits, the most
    sensitive matrix) and layers the int4 kernel cannot take (input not a multiple of the group size,
    output not of 16) get int8; layers named in `keep` (MoE routers: small, and their choice is
    discrete) stay as they are. Returns the layers replaced."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize must be one of {SCHEMES}, got {scheme!r}")
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if hasattr(child, "load_expert"):  # a MoE layer's stacked experts
                fits = scheme == "int8" or (
                    child.w2.shape[2] % group_size == 0 and child.w13.shape[2] % group_size == 0
                )
                setattr(parent, name, QuantizedExperts(child, scheme if fits else "int8", group_size))
                n += 1
                continue
            if not isinstance(child, nn.Linear | CpuLinear) or name in keep:
                continue
            weight, bias = child.weight.detach(), child.bias
            n_out, k_in = weight.shape
            fits = scheme == "int8" or (k_in % group_size == 0 and n_out % 16 == 0 and name not in int8_only)
            setattr(parent, name, quantized(weight, bias, scheme if fits else "int8", group_size))
            n += 1
    return n
