"""``LLMEngine``: add requests, call ``step()``, read outputs. The loop every front end is built on.

A step is three parts, so a front end can overlap host work with the workers' forward pass:

- ``begin_step()``: schedule and hand the plan to the workers (they compute it from now on);
- ``take_outputs()``: the output processing of earlier steps (detokenization, ``RequestOutput``s), which
  needs nothing of the running step; a server also streams and takes in client messages here;
- ``end_step()``: collect the result, append the tokens and finish requests that stopped. Only what decides
  whether a request stops is done here: token checks, and detokenization for requests with stop strings.

With async scheduling (multi-process engines, ``SchedulerConfig.async_scheduling``) ``begin_step()`` plans
step N+1 while step N still runs, its decode chunks naming the tokens step N samples as ``PENDING_TOKEN``
(the worker fills them in), and ``end_step()`` then collects step N, leaving N+1 running: the worker finds
its next plan waiting when a step ends, and the frontend's work between steps leaves the critical path. A
plan that copies KV runs alone: it goes out once no step is in flight (safety rule 1), and its result is
applied before the next plan is made (swap states change only at results). A request that stops at step N
on a stop token has computed one token more in step N+1, which is dropped (a request whose next token is
its last by length is not planned again, nor preempted).

``step()`` is all three in order and returns this step's outputs, as an offline caller expects (it leaves
no step in flight); ``run()`` steps until no work is left with each step's output processing overlapping
the next one.
"""

from __future__ import annotations

import itertools
import logging
import uuid
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fs_engine.config import EngineConfig
from fs_engine.engine.executor import InProcessExecutor
from fs_engine.engine.mp_executor import MultiprocExecutor
from fs_engine.kv.cpu_store import CpuKVStore
from fs_engine.kv.kv_manager import KVCacheManager, blocks_for
from fs_engine.model_config import ModelArch, load_model_arch
from fs_engine.request import Request, RequestOutput, RequestStatus
from fs_engine.sampling_params import SamplingParams
from fs_engine.sched.scheduler import Scheduler
from fs_engine.sim.clock import WallClock
from fs_engine.sim.devices import is_simulated
from fs_engine.sim.executor import SimExecutor
from fs_engine.tokenizer import IncrementalDetokenizer, load_tokenizer
from ipc.messages import StepResult

Prompt = str | list[int]
logger = logging.getLogger(__name__)


def resolve_model_path(model: str | Path | None) -> str:
    if model is None:
        from fs_engine.tiny_model import default_model_path

        return str(default_model_path())
    path = Path(model).expanduser()
    if not path.exists():
        raise ValueError(f"model path {str(path)!r} does not exist; pass a Hugging Face checkpoint directory")
    return str(path)


def resolve_max_model_len(config: EngineConfig, arch: ModelArch) -> int:
    limit = arch.max_context
    wanted = config.model.max_model_len
    if wanted is None:
        return limit
    if wanted > limit:
        raise ValueError(
            f"max_model_len={wanted} exceeds what the model supports ({limit} tokens: "
            f"max_position_embeddings{' / sliding_window' if arch.sliding_window else ''}); lower it"
        )
    return wanted


def _make_executor(config: EngineConfig, arch: ModelArch, max_model_len: int, multiprocess: bool):
    tp = config.parallel.tensor_parallel_size
    if is_simulated(config.device.device):
        if multiprocess:
            raise ValueError("a simulated device runs in this process; drop multiprocess=True (or the device=sim:...)")
        if tp > 1:
            check_tensor_parallel(arch, tp, "cpu")  # the ranks are simulated: only the shapes must shard
        return SimExecutor(config, arch, max_model_len)
    if tp > 1:
        check_tensor_parallel(arch, tp, config.device.device, config.parallel.ranks_per_node)
        if config.parallel.node_rank > 0:
            raise ValueError(f"node_rank={config.parallel.node_rank} runs ranks only: start it with fs-engine launch")
        if not multiprocess:
            raise ValueError(f"tensor_parallel_size={tp} runs one worker process per rank: pass "
                             "multiprocess=True (LLM and fs-engine launch do)")
    executor_cls = MultiprocExecutor if multiprocess else InProcessExecutor
    return executor_cls(config, arch, max_model_len)


MAX_PRIORITY = (1 << 31) - 1
MAX_LABEL_CHARS = 1024  # request ids, tenants, session ids


def _check_label(name: str, value: object) -> None:
    """Ids and names a request carries (hashed and compared every step): short strings."""
    if not isinstance(value, str) or not 0 < len(value) <= MAX_LABEL_CHARS:
        raise ValueError(f"{name} must be a non-empty string of at most {MAX_LABEL_CHARS} characters, "
                         f"got {value!r:.60}")


def check_tensor_parallel(arch: ModelArch, tp: int, device: str, local_ranks: int | None = None) -> None:
    """The start-up checks of a sharded model, before any process starts, with what to change."""
    import torch

    for what, total in (("num_attention_heads", arch.num_heads), ("intermediate_size", arch.intermediate_size)):
        if total % tp:
            raise ValueError(f"tensor_parallel_size={tp} does not divide the model's {what}={total}: "
                             f"choose a divisor of {total}")
    if arch.num_kv_heads >= tp and arch.num_kv_heads % tp:
        raise ValueError(f"tensor_parallel_size={tp} does not divide num_key_value_heads={arch.num_kv_heads} "
                         f"(fewer KV heads than ranks are replicated, more must split evenly)")
    if tp > arch.num_kv_heads and tp % arch.num_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp} is not a multiple of num_key_value_heads={arch.num_kv_heads}: "
                         f"each KV head must be replicated on the same number of ranks")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    local = tp if local_ranks is None else local_ranks  # the ranks this machine runs
    if cuda and torch.cuda.device_count() < local:
        raise ValueError(f"{local} ranks on this machine need {local} GPUs, it has {torch.cuda.device_count()}"
                         + ("" if local == tp else f" (tensor_parallel_size={tp} over nnodes machines)"))


class LLMEngine:
    """``multiprocess=True`` runs the model in a worker process and swaps in a swap process (the deployed
    shape, used by ``fs-engine launch``); the default runs everything in this process."""

    def __init__(self, model: str | Path | None = None, *, multiprocess: bool = False, **engine_args: Any) -> None:
        model_path = resolve_model_path(model)
        self.config = EngineConfig.from_kwargs(model=model_path, **engine_args)
        self.arch = load_model_arch(model_path)
        self.max_model_len = resolve_max_model_len(self.config, self.arch)
        self.tokenizer = load_tokenizer(self.config.model.tokenizer or model_path)
        eos = set(self.arch.eos_token_ids)
        if not eos and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.executor = _make_executor(self.config, self.arch, self.max_model_len, multiprocess)
        self.clock = getattr(self.executor, "clock", None) or WallClock()  # the time the engine's steps take
        self.block_size = self.config.cache.block_size
        self.kv = KVCacheManager(self.executor.num_blocks, self.block_size, self.config.cache.block_allocator)
        self.cpu_store = CpuKVStore(self.executor.num_cpu_blocks, self.block_size, self.config.swap.enable_kv_reuse)
        self.scheduler = Scheduler(self.config.scheduler, self.kv, self.cpu_store, self.config.swap,
                                   max_model_len=self.max_model_len)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._arrivals = itertools.count()
        self._counters = dict.fromkeys(
            ("num_steps", "num_prompt_tokens", "num_generated_tokens", "num_batched_tokens",
             "num_finished_requests", "num_aborted_requests", "num_failed_requests", "num_async_plans"), 0
        )
        self._execute_s = 0.0
        self._swap_wait_s = 0.0
        self._worker_idle_s = 0.0  # the worker waited for the next plan while the engine had work
        self._busy = False  # the last step left work to do: the gap until the next plan counts as idle
        self._in_flight: deque = deque()  # plans begun and not yet collected, oldest first
        self._max_in_flight = getattr(self.executor, "max_steps_in_flight", 1)
        self._began = False  # the last begin_step started a step
        self._alone = False  # ... whose plan copies KV: collected before the next plan is made
        self._unprocessed: dict[str, Request] = {}  # requests with tokens not turned into outputs yet

    # ---- requests ----------------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: Prompt,
        params: SamplingParams | None = None,
        priority: int = 0,
        tenant: str = "default",
        session_id: str | None = None,
    ) -> None:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        _check_label("request_id", request_id)
        _check_label("tenant", tenant)
        if session_id is not None:
            _check_label("session_id", session_id)
        if not isinstance(priority, int) or isinstance(priority, bool) or not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
            raise ValueError(f"priority must be an integer in [-{MAX_PRIORITY}, {MAX_PRIORITY}], got {priority!r:.40}")
        if request_id in self.scheduler.requests or request_id in self._unprocessed:  # (its last output not taken)
            raise ValueError(f"request id {request_id!r} is already in use; pick a unique id")
        prompt_text, token_ids = self._tokenize(prompt)
        self._check_fits(token_ids, params)
        request = Request(
            request_id, token_ids, params, prompt=prompt_text, priority=priority, tenant=tenant,
            session_id=session_id, arrival_seq=next(self._arrivals),
        )
        if self.tokenizer is not None:
            self._detokenizers[request_id] = IncrementalDetokenizer(
                self.tokenizer, params.stop, params.skip_special_tokens
            )
        elif params.stop:
            raise ValueError("stop strings need a tokenizer, and this model directory has none; use stop_token_ids")
        self.scheduler.add_request(request)

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(
                    "this model directory has no tokenizer, so prompts must be lists of token ids, not text"
                )
            token_ids = list(self.tokenizer(prompt).input_ids)
            text: str | None = prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            token_ids, text = list(prompt), None
            bad = [t for t in token_ids if not 0 <= t < self.arch.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.arch.vocab_size})")
        else:
            raise ValueError(f"a prompt must be a string or a list of int token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("the prompt is empty; give at least one token")
        return text, token_ids

    def _check_fits(self, token_ids: list[int], params: SamplingParams) -> None:
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(token_ids)} tokens but max_model_len is {self.max_model_len}, which leaves "
                f"no room to generate; shorten the prompt or raise max_model_len"
            )
        final_len = min(len(token_ids) + params.max_tokens, self.max_model_len)
        need = blocks_for(final_len, self.block_size)
        if need > self.kv.num_blocks:
            raise ValueError(
                f"this request needs {need} KV blocks ({final_len} tokens) but the cache has only "
                f"{self.kv.num_blocks}; lower max_tokens or give the engine more KV memory"
            )

    def abort(self, request_id: str) -> None:
        request = self.scheduler.requests.get(request_id)
        if request is None:
            raise ValueError(f"unknown request id {request_id!r}: it never existed or has already finished")
        self._finish(request, RequestStatus.FINISHED_ABORTED)

    def update_priority(self, request_id: str, priority: int) -> None:
        """Change a live request's priority (``policy="priority"``: lower runs first); applies from the next step."""
        if not isinstance(priority, int) or isinstance(priority, bool) or not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
            raise ValueError(f"priority must be an integer in [-{MAX_PRIORITY}, {MAX_PRIORITY}], got {priority!r:.40}")
        self.scheduler.update_priority(request_id, priority)

    def has_unfinished_requests(self) -> bool:
        """Work left: live requests, copies or steps in flight, or outputs not taken yet."""
        return self.scheduler.has_unfinished() or bool(self._in_flight) or bool(self._unprocessed)

    # ---- the loop ----------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        self.begin_step()
        while self._in_flight:
            self._collect()
        return self.take_outputs()

    def run(self) -> Iterator[list[RequestOutput]]:
        """Step until no work is left, each step's output processing overlapping the next step's forward pass
        (as ``fs-engine launch`` does); yields outputs as they become ready."""
        while self.has_unfinished_requests():
            self.begin_step()
            outputs = self.take_outputs()
            self.end_step()
            if outputs:
                yield outputs

    def begin_step(self) -> bool:
        """Schedule a step and start it on the workers; False if there is nothing to run. With async
        scheduling a step may be in flight already: the new plan queues behind it."""
        assert len(self._in_flight) < self._max_in_flight, "begin_step with every step slot busy: call end_step"
        plan = self.scheduler.schedule()
        self._fail_faulted("scheduling")
        self._began = False
        has_work = plan.request_ids or plan.finished_ids or plan.new_requests or plan.swaps
        if not has_work and self._in_flight:  # nothing new while a step runs: that step's end will tell
            self.scheduler.update(plan, StepResult(step_id=plan.step_id))
            return False
        # a plan with no forward work still goes out while copies are in flight: the worker lands them
        if not (has_work or self.scheduler.has_unfinished()):
            self._busy = False
            self.scheduler.update(plan, StepResult(step_id=plan.step_id))
            return False
        while plan.swaps and self._in_flight:  # rule 1: copies are issued with no step running
            self._collect()
        self._counters["num_async_plans"] += bool(self._in_flight)  # planned before the last result
        self.executor.submit(plan)
        self._in_flight.append(plan)
        self._began, self._alone = True, bool(plan.swaps)
        return True

    def end_step(self) -> None:
        """Collect a step's result and apply it; its outputs wait for ``take_outputs``. With async scheduling
        the step just begun stays in flight (the oldest one is collected) while it has company to queue behind
        it; called after every ``begin_step``, this keeps one step computing and the next one waiting."""
        if not self._in_flight:
            return
        if self._began and not self._alone and len(self._in_flight) < self._max_in_flight:
            return  # the next begin_step queues behind it
        self._collect()

    def _collect(self) -> None:
        plan = self._in_flight.popleft()
        result = self.executor.collect()
        self._execute_s += result.execute_s
        self._swap_wait_s += result.swap_wait_s
        if self._busy:
            self._worker_idle_s += result.idle_s
        if plan.request_ids:
            self._counters["num_steps"] += 1
            self._counters["num_batched_tokens"] += plan.num_tokens
        for request in self.scheduler.update(plan, result):
            if request.num_output_tokens == 1:
                self._counters["num_prompt_tokens"] += request.num_prompt_tokens
            self._counters["num_generated_tokens"] += 1
            try:
                self._check_stop(request)
            except Exception as e:  # noqa: BLE001 - one request's fault fails that request, not the engine
                self._fail(request, e, "checking whether it stops")
            self._unprocessed[request.request_id] = request
        self._fail_faulted("applying a step's result to")
        self._busy = self.scheduler.has_unfinished()

    def take_outputs(self) -> list[RequestOutput]:
        """Outputs of every request that got tokens since the last call (one per request, its latest)."""
        requests, self._unprocessed = self._unprocessed, {}
        outputs = []
        for request in requests.values():
            if request.status is RequestStatus.FINISHED_ABORTED:
                continue
            try:
                outputs.append(self._output(request))
            except Exception as e:  # noqa: BLE001 - one request's fault fails that request, not the engine
                self._fail(request, e, "detokenizing")
                outputs.append(self._error_output(self._unprocessed.pop(request.request_id)))
        return outputs

    def _check_stop(self, request: Request) -> None:
        token = request.token_ids[-1]
        params = request.params
        detok = self._detokenizers.get(request.request_id)
        status = None
        if params.stop and detok is not None and detok.append(token) is not None:  # stop strings need the text now
            status = RequestStatus.FINISHED_STOPPED
        elif (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif request.num_output_tokens >= params.max_tokens or request.num_tokens >= self.max_model_len:
            status = RequestStatus.FINISHED_LENGTH
        if status is None:
            return
        if params.stop and detok is not None and detok.flush() is not None:
            status = RequestStatus.FINISHED_STOPPED  # the held-back tail completed a stop string
        self._finish(request, status)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        key = {RequestStatus.FINISHED_ABORTED: "num_aborted_requests",
               RequestStatus.FINISHED_ERROR: "num_failed_requests"}.get(status, "num_finished_requests")
        self._counters[key] += 1
        if status is RequestStatus.FINISHED_ABORTED:
            self._detokenizers.pop(request.request_id, None)
            self._unprocessed.pop(request.request_id, None)

    def _fail_faulted(self, doing: str) -> None:
        for request, error in self.scheduler.take_faults():
            self._fail(request, error, doing)

    def _fail(self, request: Request, error: Exception, doing: str) -> None:
        """Handling ``request`` raised: it alone fails (its KV freed, its caller told why, with an id to find
        the traceback in the log), and the engine serves on."""
        error_id = uuid.uuid4().hex[:12]
        logger.error("internal error %s while %s request %s", error_id, doing, request.request_id, exc_info=error)
        request.error = (f"internal error {error_id} while {doing} this request: it failed (the server's log "
                         f"has the details)")
        if not request.status.finished:
            self._finish(request, RequestStatus.FINISHED_ERROR)
        else:  # it had finished (its KV is whole), then its output failed: it counts as failed
            self._counters["num_finished_requests"] -= 1
            self._counters["num_failed_requests"] += 1
        self._detokenizers.pop(request.request_id, None)
        self._unprocessed[request.request_id] = request  # its caller learns of it with the next outputs

    @staticmethod
    def _error_output(request: Request) -> RequestOutput:
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids,
                             request.output_token_ids, "", True, "error", request.num_cached_tokens, request.error)

    def _output(self, request: Request) -> RequestOutput:
        if request.error is not None:
            return self._error_output(request)
        finished = request.status.finished
        detok = (self._detokenizers.pop if finished else self._detokenizers.get)(request.request_id, None)
        if detok is not None and not request.params.stop:  # the text of tokens decoded only now
            for token in request.token_ids[request.num_prompt_tokens + detok.num_tokens :]:
                detok.append(token)
            if finished:
                detok.flush()
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=request.output_token_ids,
            text=detok.text if detok is not None else "",
            finished=finished,
            finish_reason=request.status.finish_reason,
            num_cached_tokens=request.num_cached_tokens,
            logprobs=list(request.logprobs) if request.logprobs is not None else None,
        )

    # ---- introspection -----------------------------------------------------------------------------------
    def stats(self) -> dict[str, int | float]:
        return {
            **self._counters,
            **self.scheduler.stats(),
            "num_gpu_blocks": self.kv.num_blocks,
            "num_free_gpu_blocks": self.kv.num_free_blocks,
            "num_cpu_blocks": self.cpu_store.num_blocks,
            "num_free_cpu_blocks": self.cpu_store.num_free_blocks,
            "num_cached_cpu_blocks": self.cpu_store.num_cached_blocks(),
            "reused_swap_out_bytes": self.scheduler.num_reused_swap_out_blocks * self.executor.layout.block_bytes,
            "mean_groups_per_request": round(self.kv.mean_groups_per_request(), 3),
            "largest_free_extent_blocks": self.kv.largest_free_extent(),
            "block_size": self.block_size,
            "kv_block_bytes": self.executor.layout.block_bytes,
            "max_model_len": self.max_model_len,
            "execute_s": round(self._execute_s, 6),
            "swap_wait_s": round(self._swap_wait_s, 6),
            "worker_idle_s": round(self._worker_idle_s, 6),
            "worker_idle_fraction": round(self._worker_idle_s / max(1e-9, self._worker_idle_s + self._execute_s), 4),
            **self.executor.stats(),
        }

    def check_health(self) -> None:
        """Raise ``EngineDeadError`` if a worker or the swap process has died (multi-process engines)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        self.executor.shutdown()

    def __repr__(self) -> str:
        return f"LLMEngine({self.config.model.model!r}, device={self.executor.device}, blocks={self.kv.num_blocks})"
