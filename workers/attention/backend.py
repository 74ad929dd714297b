"""The interface every attention backend implements, and the per-step metadata they read.

A step's tokens are flattened into one batch: request ``i`` owns query rows
``query_start_loc[i] : query_start_loc[i + 1]``, which are its positions ``seq_lens[i] - query_len .. seq_lens[i] - 1``
(an already-cached prefix of ``seq_lens[i] - query_len`` tokens precedes them). ``slot_mapping[t]`` is the
flat slot (``block_id * block_size + offset``) where token ``t``'s K and V are stored; ``block_tables[i]``
lists request ``i``'s blocks, padded with 0.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    seq_lens: torch.Tensor  # [num_seqs] int32
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    # host-side copies, so backends can plan without a device sync
    query_lens_host: list[int]
    seq_lens_host: list[int]
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


class AttentionBackend(ABC):
    """Stores new K/V into the arena and computes causal attention over each request's cached context."""

    name: str

    def __init__(self, kv_arena: torch.Tensor, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        # kv_arena: [num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
        self.kv_arena = kv_arena
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.block_size = kv_arena.shape[3]
        self.scale = head_dim**-0.5

    def layer_cache(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Strided views [num_blocks, block_size, num_kv_heads, head_dim] of one layer's K and V."""
        return self.kv_arena[:, layer, 0], self.kv_arena[:, layer, 1]

    supports_cuda_graphs = False

    def for_cuda_graph(self, batch_size: int, max_seq_len: int) -> AttentionBackend:
        """A backend for decode steps of exactly ``batch_size`` rows of up to ``max_seq_len`` tokens, captured in
        a CUDA graph: a fixed grid, no host reads of device data, nothing allocated during replay, and any
        workspace allocated now and kept while the graph lives (see ``workers.cuda_graphs``)."""
        raise NotImplementedError(f"the {self.name} attention backend cannot be captured in a CUDA graph")

    @abstractmethod
    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] -> [tokens, heads, head_dim]."""
