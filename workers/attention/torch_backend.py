"""Reference attention in plain torch: runs anywhere, and is the oracle the GPU kernels are tested against.

Decode-only steps gather every request's context through its block table into one padded batch (the
query heads sharing a KV head attend as one group of rows); steps with prefill chunks loop over requests
(each chunk attends to its cached prefix and, causally, to itself). Both use torch's
scaled_dot_product_attention, and neither copies K/V per query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workers.attention.backend import AttentionBackend, AttentionMetadata


class TorchAttentionBackend(AttentionBackend):
    name = "torch"

    def store_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        k_cache, v_cache = self.layer_cache(layer)
        blocks = torch.div(slot_mapping, self.block_size, rounding_mode="floor")
        offsets = slot_mapping % self.block_size
        # index_put on the strided per-layer view writes straight into the arena
        k_cache[blocks, offsets] = k.to(k_cache.dtype)
        v_cache[blocks, offsets] = v.to(v_cache.dtype)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        self.store_kv(layer, k, v, meta.slot_mapping)
        if meta.decode_only:
            return self._decode(layer, q, meta)
        return self._prefill(layer, q, meta)

    def _gather(self, layer: int, block_table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of the blocks in ``block_table`` ([..., n]) -> two [..., n * block_size, kv_heads, head_dim].

        One layer's K (or V) of one block is a contiguous [block_size, kv_heads, head_dim] slab of the arena,
        so one index_select per K and V copies whole slabs into a contiguous result, which views as tokens.
        """
        lead = block_table.shape[:-1]
        index = block_table.reshape(-1).long()
        k_cache, v_cache = self.layer_cache(layer)  # [num_blocks, block_size, kv_heads, head_dim], strided
        k = k_cache.index_select(0, index).view(*lead, -1, self.num_kv_heads, self.head_dim)
        v = v_cache.index_select(0, index).view(*lead, -1, self.num_kv_heads, self.head_dim)
        return k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q: [..., Tq, H, D], k/v: [..., Tk, KVH, D], mask: broadcastable to [..., H, Tq, Tk] (True = keep)."""
        out = F.scaled_dot_product_attention(
            q.transpose(-3, -2),  # [..., H, Tq, D]
            k.transpose(-3, -2),  # [..., KVH, Tk, D]
            v.transpose(-3, -2),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(-3, -2)  # [..., Tq, H, D]

    def _decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_blocks = -(-meta.max_seq_len // self.block_size)
        k, v = self._gather(layer, meta.block_tables[:, :num_blocks])  # [B, Tk, KVH, D]
        positions = torch.arange(k.shape[1], device=q.device)
        valid = positions[None, :] < meta.seq_lens[:, None]  # [B, Tk]
        # one query row per head: the heads that share a KV head attend as one group of rows against it,
        # so GQA needs neither repeated K/V nor the slower grouped kernel
        num_seqs, group = q.shape[0], self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(
            q.reshape(num_seqs, self.num_kv_heads, group, self.head_dim),  # [B, KVH, group, D]
            k.transpose(1, 2),  # [B, KVH, Tk, D]
            v.transpose(1, 2),
            attn_mask=valid[:, None, None, :],
            scale=self.scale,
        )
        return out.reshape(num_seqs, self.num_heads, self.head_dim)

    def _prefill(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
            k, v = self._gather(layer, meta.block_tables[i, : -(-seq_len // self.block_size)])
            k, v = k[:seq_len], v[:seq_len]
            # query row r sits at position (seq_len - q_len + r) and sees keys 0 ..= that position
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            k_pos = torch.arange(seq_len, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # [Tq, Tk]
            out[start : start + q_len] = self._attend(q[start : start + q_len], k, v, mask)
            start += q_len
        return out
