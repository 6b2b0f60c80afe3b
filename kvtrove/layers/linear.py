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


class CpuLinear(nn.Module):
    """The same math as nn.Linear on kvtrove's C++ kernel (`csrc/linear.cpp`) for every step, one token or a
    whole prefill: each output has one fixed summation order, so a token's numbers do not depend on the
    tokens computed with it, on the thread count or on the CPU's vector width. Without the kernels,
    torch's F.linear (whose order depends on the batch shape)."""

    kernels = None  # kvtrove's C++ CPU kernels

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels=None):
        super().__init__()
        self.weight = weight.contiguous()
        self.bias = bias
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is None:
            return F.linear(x, self.weight, self.bias)
        if x.dim() == 2:  # the common case, with the least Python
            return self.kernels.linear(x, self.weight, self.bias)
        y = self.kernels.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias)
        return y.view(*x.shape[:-1], -1)


def use_cpu_kernels(model: nn.Module, kernels=None) -> None:
    """Swap every CPU nn.Linear (fused ones included) for a CpuLinear, and hand `kernels` to every layer
    that declares a `kernels` slot; model code stays unchanged.

    `kernels` is the compiled C++ module (`kernels.cpu_kernels()`), or None for torch ops only.
    """
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                bias = None if child.bias is None else child.bias.detach()
                fast = CpuLinear(child.weight.detach(), bias)
                if hasattr(child, "offsets"):  # a fused layer: where each projection's rows start
                    fast.offsets = child.offsets
                setattr(parent, name, fast)
    for module in model.modules():
        if hasattr(type(module), "kernels"):
            module.kernels = kernels
