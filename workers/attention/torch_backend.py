"""Reference attention in plain torch: runs anywhere, and is the oracle the GPU kernels are tested against.

Decode-only steps gather every request's context through its block table into one padded batch;
steps with prefill chunks loop over requests (each chunk attends to its cached prefix and, causally,
to itself). Both use torch's scaled_dot_product_attention, which handles GQA without copying K/V per head.
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

        One layer's K and V of one block form a contiguous [2, block_size, kv_heads, head_dim] slab of the
        arena, so a single index_select over slabs copies whole slabs instead of scattered elements.
        """
        arena = self.kv_arena
        lead = block_table.shape[:-1]
        slabs = arena[:, layer].view(arena.shape[0], -1)  # [num_blocks, 2 * block_size * kv_heads * head_dim]
        kv = slabs.index_select(0, block_table.reshape(-1).long())
        kv = kv.view(*lead, -1, 2, self.block_size, self.num_kv_heads, self.head_dim)
        k = kv.select(-4, 0).reshape(*lead, -1, self.num_kv_heads, self.head_dim)
        v = kv.select(-4, 1).reshape(*lead, -1, self.num_kv_heads, self.head_dim)
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
        mask = valid[:, None, None, :]  # [B, 1, 1, Tk]
        return self._attend(q.unsqueeze(1), k, v, mask).squeeze(1)

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
