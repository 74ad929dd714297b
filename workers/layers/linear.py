"""Linear layers that shard across tensor-parallel ranks (Megatron layout).

Each parameter carries a ``weight_loader(param, loaded, shard_id)`` that copies this rank's slice of a
checkpoint tensor into place, so the model code is the same at every tensor-parallel size:

- ``ColumnParallelLinear``: output features split across ranks, no communication.
- ``MergedColumnParallelLinear``: several column-parallel matrices stacked (gate+up), loaded per shard.
- ``QKVParallelLinear``: q, k, v stacked, split by heads; K/V heads are replicated when there are fewer
  KV heads than ranks.
- ``RowParallelLinear``: input features split, outputs summed with an all-reduce.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.checkpoint_slice import materialize
from workers.parallel import SINGLE, TPContext


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


class ColumnParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp: TPContext = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.output_size_per_rank = tp.shard(output_size, "output features")
        self.weight = _param(self.output_size_per_rank, input_size)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(self.output_size_per_rank) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        rows = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp.rank * rows, rows))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, tp: TPContext = SINGLE):
        self.output_sizes_per_rank = [tp.shard(n, "output features") for n in output_sizes]
        super().__init__(input_size, sum(output_sizes), bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        assert isinstance(shard_id, int)
        size = self.output_sizes_per_rank[shard_id]
        offset = sum(self.output_sizes_per_rank[:shard_id])
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp: TPContext = SINGLE,
    ) -> None:
        self.head_dim = head_dim
        self.num_heads = tp.shard(num_heads, "num_attention_heads")
        # fewer KV heads than ranks: each rank keeps (a replica of) one KV head
        self.num_kv_heads = max(1, num_kv_heads // tp.size) if num_kv_heads >= tp.size else 1
        if num_kv_heads >= tp.size and num_kv_heads % tp.size:
            raise ValueError(f"num_key_value_heads={num_kv_heads} is not divisible by tensor_parallel_size={tp.size}")
        self.kv_replicas = max(1, tp.size // num_kv_heads)
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim * tp.size
        super().__init__(hidden_size, out, bias, tp)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        if shard_id == "q":
            offset, size, src_index = 0, q_size, self.tp.rank
        elif shard_id in ("k", "v"):
            offset = q_size + (0 if shard_id == "k" else kv_size)
            size, src_index = kv_size, self.tp.rank // self.kv_replicas
        else:
            raise ValueError(f"unknown qkv shard {shard_id!r}")
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, src_index * size, size))


class RowParallelLinear(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp: TPContext = SINGLE) -> None:
        super().__init__()
        self.tp = tp
        self.input_size_per_rank = tp.shard(input_size, "input features")
        self.weight = _param(output_size, self.input_size_per_rank)
        self.weight.weight_loader = self.weight_loader
        self.bias = _param(output_size) if bias else None
        if self.bias is not None:
            self.bias.weight_loader = self._bias_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        cols = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp.rank * cols, cols))

    def _bias_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        param.data.copy_(materialize(loaded))  # replicated: every rank adds it once, after the all-reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.linear(x, self.weight, self.bias)
        y = self.tp.all_reduce(F.linear(x, self.weight))
        # the bias is added once, after the sum over ranks
        return y if self.bias is None else y + self.bias
