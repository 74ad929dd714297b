"""Decode steps as CUDA graphs: one graph per padded batch size, captured at start-up, replayed every step.

A decode step launches hundreds of small kernels; replaying them as one graph removes the per-kernel launch
cost that dominates small batches. With ``compile`` on, what is captured is the Inductor-compiled forward
(its fused kernels, attention as the backend's own kernels between them). A graph replays fixed addresses and
a fixed grid, so:

- inputs live in static buffers sized for the largest captured batch; a step of ``n`` rows runs the graph of
  the smallest captured size ``>= n`` with the rows after ``n`` padded: their slot is -1, so their K/V is
  never stored, and they attend to one slot of block 0 (finite garbage that no real row reads);
- the attention backend of each graph is built for that batch size (``AttentionBackend.for_cuda_graph``):
  a fixed decode grid, per-request lengths read from device tensors, and its workspace allocated before the
  capture, never replaced while the graph lives;
- all graphs share one memory pool, captured largest first: replays never overlap, so their intermediates
  may share memory; the output of a replay is read before the next replay.

Prefill and mixed steps run outside graphs (compiled when ``compile`` is on, else eagerly). Replay equals a
run of the same padded batch outside the graph bit for bit (same kernels, same shapes); a step of ``n`` rows
may round differently from an unpadded step of ``n`` rows (the matmuls see another M), as in every engine
that pads decode batches.
"""

from __future__ import annotations

import torch

from workers.attention import AttentionBackend, AttentionMetadata
from workers.compilation import forward_context


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to ``max_batch_size`` (which is always included)."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch_size] + list(range(16, max_batch_size, 16))
    return sorted(set(sizes + [max_batch_size]))


class DecodeGraphs:
    def __init__(self, forward, attn: AttentionBackend, *, max_batch_size: int,
                 max_blocks_per_seq: int, block_size: int) -> None:
        """``forward(token_ids, positions)``: the model, eager or compiled (``workers.compilation``)."""
        self.forward = forward
        self.attn = attn
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.batch_sizes = graph_batch_sizes(max_batch_size)
        device = attn.kv_arena.device
        n = self.batch_sizes[-1]
        self.token_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.backends: dict[int, AttentionBackend] = {}

    def _meta(self, batch_size: int) -> AttentionMetadata:
        max_seq_len = self.max_blocks_per_seq * self.block_size
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size],
            query_lens_host=[1] * batch_size,
            seq_lens_host=[max_seq_len] * batch_size,  # an upper bound: only a backend's planning reads it
            max_query_len=1,
            max_seq_len=max_seq_len,
        )

    def _forward(self, batch_size: int) -> torch.Tensor:
        with forward_context(self.backends[batch_size], self._meta(batch_size)):
            return self.forward(self.token_ids[:batch_size], self.positions[:batch_size])

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for batch_size in reversed(self.batch_sizes):
            self.backends[batch_size] = self.attn.for_cuda_graph(batch_size, self.max_blocks_per_seq * self.block_size)
            self._forward(batch_size)  # warm-up: autotuning, cuBLAS handles and lazy allocations happen outside
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            # thread_local: swap threads may issue copies on their own streams while this thread captures
            with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
                self.outputs[batch_size] = self._forward(batch_size)
            pool = graph.pool() if pool is None else pool
            self.graphs[batch_size] = graph
        torch.cuda.synchronize()

    def can_run_plan(self, plan) -> bool:
        """Whether a plan is a decode step a graph can replay, from the plan alone (its inputs are built for
        the graphs): one token per chunk, few enough chunks. Block tables never outgrow
        ``max_blocks_per_seq``: both come from ``max_model_len``."""
        n = len(plan.request_ids)
        return 0 < n <= self.batch_sizes[-1] and len(plan.token_ids) == n

    def run(self, token_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode step of n <= max_batch_size rows, by graph replay. The inputs
        may be on the host (pinned: the copies into the static buffers are asynchronous) or on the device."""
        n = meta.num_seqs
        batch_size = next(b for b in self.batch_sizes if b >= n)
        width = meta.block_tables.shape[1]
        self.token_ids[:n].copy_(token_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.slot_mapping[n:batch_size].fill_(-1)  # padding rows store nothing
        self.seq_lens[:n].copy_(meta.seq_lens, non_blocking=True)
        self.seq_lens[n:batch_size].fill_(1)
        # columns past ``width`` keep stale block ids: a request reads only its first cdiv(seq_len, block_size)
        self.block_tables[:n, :width].copy_(meta.block_tables, non_blocking=True)
        self.block_tables[n:batch_size, 0].fill_(0)
        self.graphs[batch_size].replay()
        return self.outputs[batch_size][:n]
