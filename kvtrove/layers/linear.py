import torch
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
            raise ValueError(f"shard {shard} of {param_name} has shape {tuple(tensor.shape)}, "
                             f"expected {(hi - lo, *target.shape[1:])}")
        target.data[lo:hi].copy_(tensor)
