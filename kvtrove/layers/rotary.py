import torch
from torch import nn


def inv_frequencies(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    """Inverse RoPE frequencies and the cos/sin scale, for every static `rope_type` transformers knows."""
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        base = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim)), 1.0
    if rope_type == "dynamic":
        raise ValueError("rope_type 'dynamic' changes with the sequence length and is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope_type {rope_type!r}; known: {sorted(ROPE_INIT_FUNCTIONS)}")
    inv_freq, scale = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    return inv_freq.float(), float(scale)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with a cos/sin table precomputed for every position up to `max_positions`."""

    def __init__(self, hf_config, head_dim: int, max_positions: int, dtype: torch.dtype):
        super().__init__()
        self.hf_config, self.head_dim, self.max_positions, self.dtype = hf_config, head_dim, max_positions, dtype
        self.reset_buffers()

    def reset_buffers(self) -> None:
        with torch.device("cpu"):
            inv_freq, scale = inv_frequencies(self.hf_config, self.head_dim)
            self.register_buffer("inv_freq", inv_freq, persistent=False)
            freqs = torch.arange(self.max_positions, dtype=torch.float)[:, None] * inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin() * scale
            sin[:, : sin.shape[1] // 2] *= -1  # folds rotate-half's negation into the table
            self.register_buffer("cos", (emb.cos() * scale).to(self.dtype), persistent=False)
            self.register_buffer("sin", sin.to(self.dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin rows of each token, [T, D] each."""
        return self.cos.index_select(0, positions), self.sin.index_select(0, positions)


    def rerotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Keys x [..., n, D] (rotate-half layout) rotated at some positions, moved by `delta` [n] positions
        (RoPE is a rotation per frequency pair, so R(p + d) = R(d) R(p); the cos/sin scale of scaled RoPE
        types was applied once already and is not applied again). Computed in float32."""
        angle = delta.to(torch.float64)[:, None] * self.inv_freq.to(torch.float64)[None, :]  # [n, D/2]
        cos, sin = angle.cos().float(), angle.sin().float()
        x = x.float()
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, D] * cos + rotate_half(x) * sin, with rotate_half(x) = roll(x) and its sign in `sin`."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # broadcast over heads
    # three exactly rounded ops (addcmul may fuse the multiply-add in one part of a tensor and not in
    # another, so a token's value would depend on where it sits in the step)
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin
