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


# Batch-size hint for oneDNN's weight layout; measured here, the large-batch layout is also the
# fastest for single-token decode.
_PACK_HINT = 2048


class CpuLinear(nn.Module):
    """The same math as nn.Linear with the CPU kernel that suits this machine.

    - oneDNN prepacked weights where the CPU has a kernel for the dtype (fp32 everywhere with AVX2;
      bf16 needs AVX512-BF16/AVX-NE-CONVERT): no per-call repacking, ~2x faster for small batches.
    - bf16 without such a CPU: a single token uses the bf16 GEMV; more tokens upcast the weight and
      compute in float32, rounding the output to bf16 (what a bf16 GEMM with fp32 accumulation does).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.bias = bias
        self.weight: torch.Tensor | None = weight
        self.packed: torch.Tensor | None = None
        if torch.backends.mkldnn.is_available():
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, _PACK_HINT)
                self.weight = None
            except RuntimeError:
                pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        if x.dtype == torch.bfloat16 and x.numel() > x.shape[-1]:
            b = None if self.bias is None else self.bias.float()
            return F.linear(x.float(), self.weight.float(), b).to(torch.bfloat16)
        return F.linear(x, self.weight, self.bias)


def use_cpu_kernels(model: nn.Module) -> None:
    """Swap every CPU nn.Linear (fused ones included) for a CpuLinear; model code stays unchanged."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and child.weight.device.type == "cpu":
                setattr(
                    parent, name, CpuLinear(child.weight.detach(), None if child.bias is None else child.bias.detach())
                )
