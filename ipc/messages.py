"""Messages between the frontend (which decides) and the workers (which execute).

Every message is a plain dataclass of ints, floats, strings and lists so that the multi-process engine can
send it as msgpack without guessing schemas; the in-process engine passes the same objects directly.
This module imports nothing of ours (see STYLE.md: import direction).

A step plan carries a request's sampling settings once (``NewRequest``), then per step only what that step
computes (``ScheduledChunk``): its tokens and the blocks its table gained since the worker last saw it. The
worker keeps each request's block table across steps and forgets a request when its id appears in
``finished_ids``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields

PROTOCOL_VERSION = 2
INT32 = {"wire": "int32"}  # field metadata: a token-id list that travels as raw int32 bytes
PENDING_TOKEN = -1  # a plan's token id for "the token this request sampled in the step before" (async scheduling)
GREEDY_TEMPERATURE = 1e-5  # temperatures below this sample greedily


@dataclass(frozen=True)
class SamplingSpec:
    """What the worker's sampler needs of a request (stop rules stay in the frontend)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    logprobs: int = -1  # return the sampled token's log-probability and this many top ones (-1: none)
    presence_penalty: float = 0.0  # subtracted from the logit of every token the request has generated
    frequency_penalty: float = 0.0  # ... times how often it has generated it
    repetition_penalty: float = 1.0  # divides positive (multiplies negative) logits of prompt and output tokens

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def greedy(self) -> bool:
        # below this, logits / temperature overflows float32; the limit of sampling is argmax anyway
        return self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class NewRequest:
    request_id: str
    sampling: SamplingSpec
    # with a repetition penalty: the prompt, whose tokens it applies to (the worker may never see them all:
    # reused KV is not recomputed)
    prompt_token_ids: list[int] = field(default_factory=list, metadata=INT32)


@dataclass
class ScheduledChunk:
    """One request's share of a step: compute KV for ``token_ids`` at positions
    ``start_pos .. start_pos + len(token_ids) - 1`` and, if ``sample``, sample the next token.

    ``block_ids`` are the request's block-table entries from ``table_start`` on: the worker keeps the first
    ``table_start`` entries of the table it holds for the request and replaces the rest with these, so a
    plan sends a table once and then only its new blocks (``table_start=0``: the whole table).
    ``sample_index`` is the index of the token being sampled among the request's outputs; seeded sampling
    derives its random stream from it so that batching and preemption never change a seeded result.

    A view for building and reading plans; on the wire a plan's chunks travel as columns (``StepPlan``).
    """

    request_id: str
    token_ids: list[int]
    start_pos: int = 0
    block_ids: list[int] = field(default_factory=list)
    sample: bool = False
    sample_index: int = 0
    table_start: int = 0


# (src_start, dst_start, num_blocks): blocks src_start.. move to dst_start..; one copy at group granularity
SwapRun = tuple[int, int, int]


@dataclass
class SwapCommand:
    """Move KV blocks: ``kind="out"`` device -> host, runs (device_start, host_start, n); ``kind="in"``
    host -> device, runs (host_start, device_start, n). With ``wait`` the step's forward pass waits for it;
    without, it completes in the background and is reported in a later ``StepResult.swaps_done``."""

    swap_id: int
    kind: str  # "out" | "in"
    runs: list[SwapRun]
    wait: bool = False


@dataclass
class SwapDone:
    swap_id: int
    copies: int  # copy calls issued
    bytes: int
    seconds: float
    error: str | None = None  # the copy failed: its KV cannot be trusted


@dataclass(init=False)
class StepPlan:
    """One step for every rank. The worker submits every swap-out, waits for those marked ``wait``, then
    submits every swap-in, waits for those marked ``wait``, then runs the forward pass over the chunks.

    The frontend relies on that order: device blocks freed by a *waited* swap-out may be the destination of
    a swap-in or of new KV in the same plan. Blocks under an unwaited command stay owned until it is done.

    The chunks are stored as columns, one entry per chunk in batch order (token ids and new block ids
    concatenated), so a plan of hundreds of requests encodes as a few raw int32 arrays and the worker builds
    its inputs from them with vectorised tensor ops. ``chunks`` and ``add_chunk`` read and write them as
    ``ScheduledChunk`` views; ``sample_index`` is -1 for a chunk that samples nothing.

    With async scheduling a plan goes out before the previous step's tokens are known: a decode chunk whose
    input is the token its request samples in that step carries ``PENDING_TOKEN``, and the worker (which
    runs plans in order) puts in the token it sampled for that request last.
    """

    step_id: int
    new_requests: list[NewRequest]
    finished_ids: list[str]
    swaps: list[SwapCommand]
    request_ids: list[str]
    start_pos: list[int] = field(metadata=INT32)
    num_scheduled: list[int] = field(metadata=INT32)  # tokens each chunk computes
    token_ids: list[int] = field(metadata=INT32)
    sample_index: list[int] = field(metadata=INT32)
    table_start: list[int] = field(metadata=INT32)
    num_new_blocks: list[int] = field(metadata=INT32)
    new_block_ids: list[int] = field(metadata=INT32)

    def __init__(
        self,
        step_id: int,
        chunks: list[ScheduledChunk] = (),
        new_requests: list[NewRequest] | None = None,
        finished_ids: list[str] | None = None,
        swaps: list[SwapCommand] | None = None,
    ) -> None:
        self.step_id = step_id
        self.new_requests = [] if new_requests is None else new_requests
        self.finished_ids = [] if finished_ids is None else finished_ids
        self.swaps = [] if swaps is None else swaps
        for name in _PLAN_COLUMNS:
            setattr(self, name, [])
        for chunk in chunks:
            self.add_chunk(chunk)

    @classmethod
    def _from_wire(cls, *values) -> StepPlan:
        plan = object.__new__(cls)
        for f, value in zip(fields(cls), values):
            setattr(plan, f.name, value)
        return plan

    def add_chunk(self, chunk: ScheduledChunk) -> None:
        self.append(chunk.request_id, chunk.token_ids, chunk.start_pos, chunk.sample_index if chunk.sample else -1,
                    chunk.table_start, chunk.block_ids)

    def append(self, request_id: str, token_ids: list[int], start_pos: int, sample_index: int, table_start: int,
               new_block_ids: list[int]) -> None:
        """Add a chunk without a view object. ``Scheduler._add_chunk`` writes the same columns inline: once per
        request per step, this call and its slices would add about 0.13 ms to a step of 256 (measured side by side)."""
        self.request_ids.append(request_id)
        self.start_pos.append(start_pos)
        self.num_scheduled.append(len(token_ids))
        self.token_ids += token_ids
        self.sample_index.append(sample_index)
        self.table_start.append(table_start)
        self.num_new_blocks.append(len(new_block_ids))
        if new_block_ids:
            self.new_block_ids += new_block_ids

    @property
    def chunks(self) -> list[ScheduledChunk]:
        out, tok, blk = [], 0, 0
        for i, request_id in enumerate(self.request_ids):
            n, k, s = self.num_scheduled[i], self.num_new_blocks[i], self.sample_index[i]
            out.append(ScheduledChunk(request_id, self.token_ids[tok : tok + n], self.start_pos[i],
                                      self.new_block_ids[blk : blk + k], s >= 0, max(s, 0), self.table_start[i]))
            tok, blk = tok + n, blk + k
        return out

    @property
    def num_chunks(self) -> int:
        return len(self.request_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def sampled_ids(self) -> list[str]:
        return [r for r, s in zip(self.request_ids, self.sample_index) if s >= 0]

    def with_swaps(self, swaps: list[SwapCommand]) -> StepPlan:
        """The same plan with other swaps (none: for the workers when the swap process runs them)."""
        plan = copy.copy(self)
        plan.swaps = swaps
        return plan


_PLAN_COLUMNS = ("request_ids", "start_pos", "num_scheduled", "token_ids", "sample_index", "table_start",
                 "num_new_blocks", "new_block_ids")


@dataclass
class StepResult:
    """Rank 0's answer to a plan: one sampled token per chunk that asked for one, in plan order."""

    step_id: int
    request_ids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list, metadata=INT32)
    execute_s: float = 0.0
    swaps_done: list[SwapDone] = field(default_factory=list)  # every command completed since the last result
    swap_wait_s: float = 0.0  # time this step waited on swaps before its forward pass
    idle_s: float = 0.0  # how long the worker waited for this plan since it returned the previous result
    num_compilations: int = 0  # times the worker's forward has been compiled so far (0: it runs eagerly)
    # per sampled token, when any request of the step asked for logprobs (else both empty): the sampled token
    # and then its request's top-k, ids and log-probabilities (an empty pair for a request that did not ask)
    logprob_ids: list[list[int]] = field(default_factory=list)
    logprob_values: list[list[float]] = field(default_factory=list)


# ---- client <-> frontend ---------------------------------------------------------------------------------
# A client sends requests on a DEALER socket; the frontend answers on its ROUTER. Request ids are the
# client's own (unique per client); every reply carries the id of the request it answers.


@dataclass
class GenerateRequest:
    """``prompt`` is text, or None with ``prompt_token_ids`` given. ``params`` holds SamplingParams fields
    (validated by the frontend). ``stream``: a TokenEvent per step, else one at the end."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None = field(default=None, metadata=INT32)
    params: dict = field(default_factory=dict)
    priority: int = 0
    tenant: str = "default"
    session_id: str | None = None
    stream: bool = True


@dataclass
class TokenEvent:
    """New output of one request: token ids and text since the previous event; the last has finish_reason."""

    request_id: str
    token_ids: list[int] = field(default_factory=list, metadata=INT32)
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    num_cached_tokens: int = 0
    prompt_token_ids: list[int] | None = field(default=None, metadata=INT32)  # on the first event only
    # with the logprobs parameter: per new token, the ids and log-probabilities of the sampled and top tokens
    logprob_ids: list[list[int]] | None = None
    logprob_values: list[list[float]] | None = None


@dataclass
class AbortRequest:
    request_id: str


@dataclass
class UpdatePriority:
    request_id: str
    priority: int


@dataclass
class StatsRequest:
    request_id: str  # a correlation id chosen by the client


@dataclass
class StatsReply:
    request_id: str
    stats: dict


@dataclass
class Ack:
    request_id: str


@dataclass
class ErrorReply:
    """The request (or, with request_id "", the message) was rejected or failed. ``fatal``: the engine is
    going down and no further replies will come."""

    request_id: str
    message: str
    fatal: bool = False


@dataclass
class KeepAlive:
    """Sent to a client with requests in progress but nothing to stream, so a vanished client is noticed."""


# ---- frontend <-> worker / swap processes ------------------------------------------------------------


@dataclass
class WorkerReady:
    rank: int
    pid: int
    num_blocks: int
    num_host_blocks: int  # what the configuration sizes for the swap process's host arena
    device: str
    dtype: str
    block_bytes: int
    arena: dict  # how another process opens this rank's device arena (shared-memory path or CUDA IPC handle)
    config_digest: str = ""  # of the engine arguments it runs with: every machine's ranks must agree
    forward: str = "eager"  # how the model's forward runs: eager, or compiled and how long that took
    num_compilations: int = 0  # of the forward, in warm-up (0: eager); a step's result carries the count on


@dataclass
class SwapReady:
    pid: int
    num_host_blocks: int


@dataclass
class OpenArenas:
    """Frontend -> swap process: every rank's device arena, and the host arena to create."""

    arenas: list[dict]
    num_host_blocks: int
    dtype: str
    granularity: str
    threads: int


@dataclass
class SwapBatch:
    commands: list[SwapCommand] = field(default_factory=list)


@dataclass
class ProcessFailed:
    """A worker or the swap process hit an error it cannot recover from; it exits after sending this."""

    who: str
    message: str


@dataclass
class Shutdown:
    reason: str = ""


# every type that may cross a process boundary, registered with the codec (ipc.codec) under its class name
MESSAGE_TYPES = (
    SamplingSpec, NewRequest, SwapCommand, SwapDone, StepPlan, StepResult,
    GenerateRequest, TokenEvent, AbortRequest, UpdatePriority, StatsRequest, StatsReply, Ack, ErrorReply, KeepAlive,
    WorkerReady, SwapReady, OpenArenas, SwapBatch, ProcessFailed, Shutdown,
)
