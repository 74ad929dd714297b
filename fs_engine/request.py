"""A request's state as the frontend tracks it."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from typing import Protocol

from fs_engine.kv.prefix_index import extend_chain
from fs_engine.sampling_params import SamplingParams


class RequestObserver(Protocol):
    def status_changed(self, request: Request, old: RequestStatus) -> None: ...

    def priority_changed(self, request: Request) -> None: ...


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # no KV anywhere: not started, or preempted by recompute
    RUNNING = "running"  # KV on the device
    SWAPPING_OUT = "swapping_out"  # preempted; its KV is being copied to host memory, device blocks still held
    SWAPPED = "swapped"  # KV in host memory only
    SWAPPING_IN = "swapping_in"  # its KV is being copied back to (already reserved) device blocks
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"
    FINISHED_ERROR = "finished_error"  # an internal error while handling this request: it alone failed

    # members are singletons, so identity hashing is exact; Enum's own __hash__ (hash of the name, in Python)
    # costs half a microsecond per lookup, and the scheduler looks statuses up for every request every step
    __hash__ = object.__hash__

    @property
    def finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


FINISHED = frozenset({RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED,
                      RequestStatus.FINISHED_ERROR})
_FINISHED = FINISHED
_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """Prompt, generated tokens and progress of one request.

    ``token_ids`` is the prompt followed by the generated tokens; ``num_computed_tokens`` of them have KV in
    the cache (``num_inflight_tokens`` more once the steps in flight land). A recompute preemption sets it back to 0: the next chunks recompute prompt and outputs alike.
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        *,
        prompt: str | None = None,
        priority: int = 0,
        tenant: str = "default",
        session_id: str | None = None,
        arrival_seq: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.prompt_token_ids)  # the prompt never changes
        self.params = params
        self._priority = priority
        self.tenant = tenant
        self.session_id = session_id
        self.arrival_seq = arrival_seq
        self.arrival_time = time.monotonic()
        self.token_ids: list[int] = list(prompt_token_ids)
        # with params.logprobs: per output token, {token id: log-probability} of the sampled and the top tokens
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        self.num_computed_tokens = 0
        # async scheduling: tokens that planned steps compute, and tokens they sample, whose results are not
        # applied yet (always 0 when plans are only made after the previous result)
        self.num_inflight_tokens = 0
        self.num_pending_tokens = 0
        self._status = RequestStatus.WAITING
        self.observer: RequestObserver | None = None  # the scheduler, told of status and priority changes
        self.num_preemptions = 0
        self.sent_to_worker = False
        self.scheduled_in_step = 0  # step in which it was last admitted or swapped in (anti-thrashing)
        self.reclaim = False  # regained its rank while swapping out: keep the device copy when the copy lands
        self.num_cached_tokens = 0  # prompt tokens swapped in from the CPU store instead of prefilled
        self.num_dropped_tokens = 0  # computed tokens its last recompute preemption dropped
        self.num_prompt_tokens_served = 0  # prompt tokens computed at least once (fair-share accounting)
        self.worker_table: list[int] | None = None  # the KV table object the worker's view was last sent from
        self.worker_table_len = 0  # ... and how many of its entries the worker holds
        self._block_hashes: list[int] = []  # chain hashes of token_ids' full blocks, as far as computed
        self.error: str | None = None  # why it failed (FINISHED_ERROR): a short reason with an error id

    @property
    def status(self) -> RequestStatus:
        return self._status

    @status.setter
    def status(self, status: RequestStatus) -> None:
        old, self._status = self._status, status
        if self.observer is not None and old is not status:
            self.observer.status_changed(self, old)

    @property
    def priority(self) -> int:
        return self._priority

    @priority.setter
    def priority(self, priority: int) -> None:
        self._priority = priority
        if self.observer is not None:
            self.observer.priority_changed(self)

    def block_hashes(self, block_size: int) -> list[int]:
        """Chain hashes (``prefix_index.chain_hashes``) of every full block of ``token_ids``, computed once:
        tokens are only ever appended, so each call hashes only blocks completed since the last."""
        done = len(self._block_hashes)
        full = len(self.token_ids) // block_size
        if full > done:
            self._block_hashes += extend_chain(self._block_hashes[-1] if done else None, self.token_ids,
                                               block_size, done, full, self.session_id)
        return self._block_hashes

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )


@dataclass
class RequestOutput:
    """What a request has produced so far; ``finished`` once ``finish_reason`` is set."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None = None
    num_cached_tokens: int = 0  # prompt tokens whose KV came from the CPU store (an earlier turn) instead of prefill
    error: str | None = None  # finish_reason "error": what failed, with an id to find it in the server's log
    # with SamplingParams.logprobs: per output token, {token id: log-probability} of the sampled token and the
    # top ones (the sampled token's entry is there even when it is not among them)
    logprobs: list[dict[int, float]] | None = None
