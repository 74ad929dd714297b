"""Reference attention in plain torch: runs anywhere, and is the oracle the GPU kernels are tested against.

Decode-only steps gather every request's context through its block table into one padded batch;
steps with prefill chunks loop over requests (each chunk attends to its cached prefix and, causally,
to itself). Scores and softmax are computed in float32.
"""

from __future__ import annotations

import torch

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

    def _gather(self, layer: int, block_table: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One request's first ``seq_len`` tokens of K and V: [seq_len, kv_heads, head_dim] each."""
        k_cache, v_cache = self.layer_cache(layer)
        n = -(-seq_len // self.block_size)
        ids = block_table[:n]
        k = k_cache[ids].reshape(-1, self.num_kv_heads, self.head_dim)[:seq_len]
        v = v_cache[ids].reshape(-1, self.num_kv_heads, self.head_dim)[:seq_len]
        return k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """q: [..., Tq, H, D], k/v: [..., Tk, KVH, D], mask: broadcastable to [..., KVH, G, Tq, Tk] (True = keep)."""
        group = self.num_heads // self.num_kv_heads
        *lead, tq, _, d = q.shape
        qg = q.float().reshape(*lead, tq, self.num_kv_heads, group, d).movedim(-4, -2)  # [..., KVH, G, Tq, D]
        kf = k.float().movedim(-3, -2).unsqueeze(-3)  # [..., KVH, 1, Tk, D]
        vf = v.float().movedim(-3, -2).unsqueeze(-3)
        scores = (qg @ kf.transpose(-1, -2)) * self.scale
        scores = scores.masked_fill(~mask, float("-inf"))
        out = scores.softmax(dim=-1) @ vf  # [..., KVH, G, Tq, D]
        return out.movedim(-2, -4).reshape(*lead, tq, self.num_heads, d).to(q.dtype)

    def _decode(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        k_cache, v_cache = self.layer_cache(layer)
        num_blocks = -(-meta.max_seq_len // self.block_size)
        table = meta.block_tables[:, :num_blocks]
        b = meta.num_seqs
        k = k_cache[table].reshape(b, -1, self.num_kv_heads, self.head_dim)  # [B, Tk, KVH, D]
        v = v_cache[table].reshape(b, -1, self.num_kv_heads, self.head_dim)
        positions = torch.arange(k.shape[1], device=q.device)
        valid = positions[None, :] < meta.seq_lens[:, None]  # [B, Tk]
        mask = valid[:, None, None, None, :]  # [B, 1, 1, 1, Tk]
        return self._attend(q.unsqueeze(1), k, v, mask).squeeze(1)

    def _prefill(self, layer: int, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for i, (q_len, seq_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
            k, v = self._gather(layer, meta.block_tables[i], seq_len)
            # query row r sits at position (seq_len - q_len + r) and sees keys 0 ..= that position
            q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)
            k_pos = torch.arange(seq_len, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # [Tq, Tk]
            out[start : start + q_len] = self._attend(q[start : start + q_len], k, v, mask)
            start += q_len
        return out
