import torch
import torch.nn.functional as F
from torch import nn


class MergedLinear(nn.Linear):
    """Several projections of one input fused into one matmul (q/k/v, gate/up).

    Checkpoints keep them apart; `load_shard` copies each into its rows.
    """

    def __init__(self, in_features: int, out_sizes: list[int], bias: bool):
        super().__init__(in_features, sum(out_sizes), bias=bias)
        self.offsets = [sum(out_sizes[:i]) for i in range(len(out_sizes) + 1)]

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        lo, hi = self.offsets[shard], self.offsets[shard + 1]
        target = getattr(self, param_name)
        if tensor.shape[0] != hi - lo or tensor.shape[1:] != target.shape[1:]:
            raise ValueError(
                f"shard {shard} of {param_name} has shape {tuple(tensor.shape)}, "
                f"expected {(hi - lo, *target.shape[1:])}"
            )
        target.data[lo:hi].copy_(tensor)


def pack_weight(w: torch.Tensor) -> torch.Tensor:
    """Weights [..., N, K] in the layout the linear kernel reads (`csrc/float_linear.cpp`): panels of 16 rows,
    each column of a panel contiguous. float32 -> [..., P, K, 16]; bfloat16 -> [..., P, ceil(K / 2), 32] (a
    column pair's two values side by side per row); P = ceil(N / 16), rows past N zero. Done once at load,
    so a decode step reads every panel as one sequential stream."""
    if w.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"the linear kernel takes float32 or bfloat16 weights, not {w.dtype}")
    *lead, n, k = w.shape
    p = -(-n // 16)
    if w.dtype == torch.float32:
        padded = F.pad(w, (0, 0, 0, 16 * p - n))
        return padded.view(*lead, p, 16, k).transpose(-1, -2).contiguous()
    k2 = -(-k // 2)
    padded = F.pad(w, (0, 2 * k2 - k, 0, 16 * p - n))
    return padded.view(*lead, p, 16, k2, 2).transpose(-2, -3).contiguous().view(*lead, p, k2, 32)


def unpack_weight(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The [..., n, k] weights `pack_weight` packed (a copy)."""
    *lead, p, cols, width = packed.shape
    if packed.dtype == torch.float32:
        rows = packed.transpose(-1, -2).reshape(*lead, 16 * p, cols)
    else:
        rows = packed.view(*lead, p, cols, 16, 2).transpose(-2, -3).reshape(*lead, 16 * p, 2 * cols)
    return rows[..., :n, :k].contiguous()


class CpuLinear(nn.Module):
    """The same math as nn.Linear on kvtrove's C++ kernel (`csrc/float_linear.cpp`) for every step, one
    token or a whole prefill: each output has one fixed summation order, so a token's numbers do not depend
    on the tokens computed with it, on the thread count or on the CPU's vector width. The kernel keeps the
    weights packed (`pack_weight`) instead of [N, K]. Without the kernels, torch's F.linear (whose order
    depends on the batch shape) on the weights as they are."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels=None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = bias
        self.kernels = kernels
        self.packed = None if kernels is None else pack_weight(weight)
        self._weight = weight.contiguous() if kernels is None else None

    @property
    def weight(self) -> torch.Tensor:
        """The weights [N, K] (unpacked: a copy, where the kernel holds them packed)."""
        if self._weight is not None:
            return self._weight
        return unpack_weight(self.packed, self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is None:
            return F.linear(x, self._weight, self.bias)
        if x.dim() == 2:  # the common case, with the least Python
            return self.kernels.linear(x, self.packed, self.out_features, self.bias)
        y = self.kernels.linear(x.reshape(-1, x.shape[-1]), self.packed, self.out_features, self.bias)
        return y.view(*x.shape[:-1], -1)


def use_cpu_kernels(model: nn.Module, kernels=None) -> None:
    """Swap every CPU nn.Linear (fused ones included) for a CpuLinear, and hand `kernels` to every layer
    that declares a `kernels` slot; model code stays unchanged. Layers that run other float weights through
    the linear kernel pack them then (`pack_for_kernels`). Runs last, once the weights are loaded and
    placed: packing is the weights' final form.

    `kernels` is the compiled C++ module (`kernels.cpu_kernels()`), or None for torch ops only.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                bias = None if child.bias is None else child.bias.detach()
                fast = CpuLinear(child.weight.detach(), bias, kernels)
                if hasattr(child, "offsets"):  # a fused layer: where each projection's rows start
                    fast.offsets = child.offsets
                setattr(parent, name, fast)
    for module in model.modules():
        if hasattr(type(module), "kernels"):
            module.kernels = kernels
            if kernels is not None and hasattr(module, "pack_for_kernels"):
                module.pack_for_kernels()
