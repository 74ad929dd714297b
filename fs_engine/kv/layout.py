"""Arithmetic of the KV arena layout, shared by the frontend (sizing, swap byte counts) and the workers.

One arena per rank, block-major so that a run of consecutive block ids is one contiguous byte range::

    arena[num_blocks, num_layers, 2, block_size, num_kv_heads, head_dim]
           block 0: | layer 0: K[16 tok] V[16 tok] | layer 1: K V | ... |
           block 1: | ...                                              |

The attention kernels read the strided per-layer view ``arena[:, layer, 0 | 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int  # on this rank
    head_dim: int
    dtype: str  # "float32" | "float16" | "bfloat16"

    @property
    def shape_per_block(self) -> tuple[int, ...]:
        return (self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def token_bytes_per_layer_kv(self) -> int:
        return self.num_kv_heads * self.head_dim * DTYPE_BYTES[self.dtype]

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all layers, K and V: the unit of allocation and of a ``block`` copy."""
        return self.num_layers * 2 * self.block_size * self.token_bytes_per_layer_kv

    def arena_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (num_blocks, *self.shape_per_block)

    def num_blocks_for_bytes(self, num_bytes: int) -> int:
        return num_bytes // self.block_bytes
