import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """silu(gate) * up for a fused [T, 2I] gate/up projection output -> [T, I]."""

    kernels = None  # kvtrove's C++ CPU kernels, bound by `use_cpu_kernels`

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None and gate_up.dim() == 2 and gate_up.is_contiguous():
            return self.kernels.silu_mul(gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
