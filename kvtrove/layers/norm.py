import torch
from torch import nn


class RMSNorm(nn.Module):
    """RMSNorm computed in float32 and cast back before the weight, as Hugging Face's Llama does.

    With a residual, the residual add is fused in (as in vLLM): `norm(x, residual)` adds x into the
    residual in place and returns (norm(residual), residual).
    """

    kernels = None  # kvtrove's C++ CPU kernels, bound by `use_cpu_kernels`

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.kernels is not None and x.is_contiguous():
            out = self.kernels.add_rms_norm(x, residual, self.weight, self.eps)
            return out if residual is None else (out, residual)
        if residual is None:
            return self._norm(x)
        residual.add_(x)
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        # vecdot instead of pow().mean(): one fused kernel, measured ~3x cheaper per call for small batches
        inv_rms = torch.linalg.vecdot(h, h).unsqueeze(-1).div_(h.shape[-1]).add_(self.eps).rsqrt_()
        return self.weight * (h * inv_rms).to(x.dtype)
