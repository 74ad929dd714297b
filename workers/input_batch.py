"""The worker's persistent view of the requests it computes, and the step inputs built from it.

Every request the worker has computed keeps a row of one preallocated block-table tensor (pinned on CUDA,
so the rows a step uses reach the device in one asynchronous copy). A plan sends a table once and then only
the blocks it gained (``ScheduledChunk.table_start``); ``update`` writes them into the rows with one
indexed store, and ``inputs`` builds token ids, positions, slot mapping, block tables and sample rows with a
dozen vectorised tensor ops, whatever the batch size or the context length. A row is freed when its request
appears in ``finished_ids``. Each row also keeps the token its request sampled last, which a plan made
before that step's result (async scheduling) names as ``PENDING_TOKEN``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ipc.messages import PENDING_TOKEN, StepPlan
from workers.attention import AttentionMetadata


def _ints(values: list[int]) -> torch.Tensor:
    """An int64 tensor of a list of ints (a few times faster than ``torch.tensor`` for short lists)."""
    return torch.from_numpy(np.fromiter(values, np.int64, len(values)))


@dataclass
class StepInputs:
    token_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    sample_rows: torch.Tensor  # [num_sampled] int64: the hidden-state rows to sample from
    sampled_table_rows: torch.Tensor  # [num_sampled] int64 (host): their requests' rows, for ``record_sampled``


class InputBatch:
    def __init__(self, block_size: int, max_blocks_per_seq: int, device: torch.device, num_rows: int = 64) -> None:
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = device
        self._pin = device.type == "cuda"
        self.tables = self._zeros(num_rows, max_blocks_per_seq)
        self.table_lens = torch.zeros(num_rows, dtype=torch.int64)  # entries each row holds
        self.last_token = torch.full((num_rows,), PENDING_TOKEN, dtype=torch.int64)  # each row's last sample
        self.rows: dict[str, int] = {}
        self._free_rows = list(range(num_rows - 1, -1, -1))

    def _zeros(self, rows: int, cols: int) -> torch.Tensor:
        return torch.zeros((rows, cols), dtype=torch.int32, pin_memory=self._pin)

    # ---- state -------------------------------------------------------------------------------------------
    def forget(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            row = self.rows.pop(request_id, None)
            if row is not None:
                self.tables[row, : int(self.table_lens[row])] = 0  # tables are padded with 0
                self.table_lens[row] = 0
                self.last_token[row] = PENDING_TOKEN
                self._free_rows.append(row)

    def table(self, request_id: str) -> list[int]:
        """The block table the worker holds for a request (empty if none)."""
        row = self.rows.get(request_id)
        return [] if row is None else self.tables[row, : int(self.table_lens[row])].tolist()

    def _row(self, request_id: str) -> int:
        row = self.rows.get(request_id)
        if row is None:
            if not self._free_rows:
                self._grow()
            row = self.rows[request_id] = self._free_rows.pop()
        return row

    def _grow(self) -> None:
        old = self.tables.shape[0]
        tables = self._zeros(2 * old, self.max_blocks_per_seq)
        tables[:old] = self.tables
        self.tables = tables
        self.table_lens = torch.cat([self.table_lens, torch.zeros(old, dtype=torch.int64)])
        self.last_token = torch.cat([self.last_token, torch.full((old,), PENDING_TOKEN, dtype=torch.int64)])
        self._free_rows = list(range(2 * old - 1, old - 1, -1))

    def update(self, plan: StepPlan) -> torch.Tensor:
        """Apply the plan's finished ids and table diffs; returns the rows of its chunks, in batch order."""
        self.forget(plan.finished_ids)
        known = self.rows.get
        ids = [known(r, -1) for r in plan.request_ids]
        if -1 in ids:  # new requests: give them rows
            ids = [self._row(r) for r in plan.request_ids]
        rows = _ints(ids)
        starts = _ints(plan.table_start)
        if bool((starts > self.table_lens[rows]).any()):
            bad = [r for r, s in zip(plan.request_ids, plan.table_start) if s > len(self.table(r))]
            raise ValueError(f"plan {plan.step_id} extends block tables the worker does not hold in full: {bad}")
        counts = _ints(plan.num_new_blocks)
        ends = starts + counts
        if len(plan.request_ids) and int(ends.max()) > self.max_blocks_per_seq:
            raise ValueError(f"plan {plan.step_id} gives a request more than {self.max_blocks_per_seq} blocks")
        if plan.new_block_ids:
            total = len(plan.new_block_ids)
            first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
            cols = torch.repeat_interleave(starts, counts) + torch.arange(total) - first
            self.tables[torch.repeat_interleave(rows, counts), cols] = _ints(plan.new_block_ids).to(torch.int32)
        shrunk = ends < self.table_lens[rows]  # a replaced table shorter than the one it replaces: clear its tail
        for row, end in zip(rows[shrunk].tolist(), ends[shrunk].tolist()):
            self.tables[row, end : int(self.table_lens[row])] = 0
        self.table_lens[rows] = ends
        return rows

    # ---- one step's inputs -------------------------------------------------------------------------------
    def _ship(self, t: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A host tensor to ``device``. A CUDA worker stages it in pinned memory (torch's caching host
        allocator), so the copy is asynchronous, and ``device=cpu`` leaves it there for the caller to copy."""
        if dtype is not None:
            t = t.to(dtype)
        if not self._pin:
            return t
        t = t.pin_memory()
        return t if device.type == "cpu" else t.to(device, non_blocking=True)

    def inputs(self, plan: StepPlan, rows: torch.Tensor, device: torch.device | None = None) -> StepInputs:
        """The step's model inputs on ``device`` (default: the worker's). ``device=cpu`` keeps the token ids,
        positions and attention metadata on the host (pinned on a CUDA worker) for a consumer that copies them
        into buffers of its own: CUDA-graph decode copies them straight into the graph's static inputs."""
        bs = self.block_size
        n = len(plan.request_ids)
        query_lens = _ints(plan.num_scheduled)
        starts = _ints(plan.start_pos)
        seq_lens = starts + query_lens
        num_tokens = len(plan.token_ids)
        if num_tokens == n:  # a decode step: one token per request, at its start position
            query_start = torch.arange(n + 1)
            seq_of_token, positions = query_start[:-1], starts
        else:
            query_start = torch.zeros(n + 1, dtype=torch.int64)
            torch.cumsum(query_lens, 0, out=query_start[1:])
            seq_of_token = torch.repeat_interleave(torch.arange(n), query_lens)
            positions = torch.arange(num_tokens) + (starts - query_start[:-1])[seq_of_token]
        max_seq_len = int(seq_lens.max())
        block_tables = self.tables.index_select(0, rows)[:, : -(-max_seq_len // bs)]
        slots = block_tables[seq_of_token, positions // bs].to(torch.int64) * bs + positions % bs
        samples = _ints(plan.sample_index) >= 0
        sample_rows = (query_start[1:] - 1)[samples]
        dev = self.device if device is None else device
        meta = AttentionMetadata(
            slot_mapping=self._ship(slots, dev),
            query_start_loc=self._ship(query_start, dev, torch.int32),
            seq_lens=self._ship(seq_lens, dev, torch.int32),
            block_tables=self._ship(block_tables, dev),
            query_lens_host=plan.num_scheduled,
            seq_lens_host=seq_lens.tolist(),
            max_query_len=max(plan.num_scheduled),
            max_seq_len=max_seq_len,
        )
        token_ids = _ints(plan.token_ids)
        if PENDING_TOKEN in plan.token_ids:  # tokens sampled by the step before this plan's (async scheduling)
            pending = token_ids == PENDING_TOKEN
            pending_rows = rows[seq_of_token[pending]]
            filled = self.last_token[pending_rows]
            if bool((filled == PENDING_TOKEN).any()):
                bad = sorted({plan.request_ids[i] for i in seq_of_token[pending][filled == PENDING_TOKEN].tolist()})
                raise ValueError(f"plan {plan.step_id} asks for the last sampled token of {bad}, which sampled none")
            token_ids[pending] = filled
        return StepInputs(self._ship(token_ids, dev), self._ship(positions, dev), meta,
                          self._ship(sample_rows, self.device), rows[samples])

    def record_sampled(self, table_rows: torch.Tensor, token_ids: list[int]) -> None:
        """The tokens a step sampled, by row (``StepInputs.sampled_table_rows``): what a later plan's
        ``PENDING_TOKEN`` stands for."""
        if token_ids:
            self.last_token[table_rows] = _ints(token_ids)

    def prepare(self, plan: StepPlan, device: torch.device | None = None) -> StepInputs | None:
        """``update`` then ``inputs``; None for a plan that computes nothing."""
        rows = self.update(plan)
        return self.inputs(plan, rows, device) if plan.request_ids else None
