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


# Up to this many tokens a step is bound by streaming the weights, and our kernel is the fastest path
# (measured on AVX2 machines against oneDNN and F.linear); beyond, oneDNN's GEMM wins.
FEW_TOKENS = {torch.float32: 16, torch.bfloat16: 64}


class CpuLinear(nn.Module):
    """The same math as nn.Linear with the CPU kernel that suits the step; one copy of the weight.

    - Few tokens (decode): kvtrove's C++ kernel, which streams the weight at read bandwidth.
    - More tokens (prefill): oneDNN's GEMM on the plain weight. bf16 on CPUs without native bf16
      (AVX512-BF16/AMX) computes in float32 and rounds the output to bf16, what a bf16 GEMM with
      float32 accumulation does.
    """

    kernels = None  # kvtrove's C++ CPU kernels

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, kernels=None):
        super().__init__()
        self.weight = weight.contiguous()
        self.bias = bias
        self.kernels = kernels
        self.few_tokens = FEW_TOKENS.get(weight.dtype, 0)
        self.onednn = torch.backends.mkldnn.is_available()
        self.upcast = weight.dtype == torch.bfloat16 and not (
            self.onednn and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and x.shape[0] <= self.few_tokens and self.kernels is not None:  # the decode path: lean
            return self.kernels.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, x.shape[-1])
        if x2.shape[0] <= self.few_tokens and self.kernels is not None:
            y = self.kernels.linear(x2, self.weight, self.bias)
        elif self.upcast:
            b = None if self.bias is None else self.bias.float()
            y = self._gemm(x2.float(), self.weight.float(), b).to(x.dtype)
        else:
            y = self._gemm(x2, self.weight, self.bias)
        return y.view(*x.shape[:-1], -1)

    def _gemm(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if self.onednn:
            return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
        return F.linear(x, w, b)


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
