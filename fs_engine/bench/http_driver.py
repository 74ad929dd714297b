"""Replay a trace through the OpenAI HTTP API (``fs-engine bench run --base-url``), against ``fs-engine serve``
or any OpenAI-compatible server (vLLM, SGLang), with the same records and metrics as the SDK replay.

Every turn is ``POST /v1/completions`` with the token ids of the whole conversation so far as the prompt,
``stream=true``, greedy, ``ignore_eos`` and ``max_tokens`` = the trace's reply length, the tenant as ``user``
and the priority the trace gives at sending time as ``priority`` (both servers' extension field; the HTTP API
cannot change a priority mid-request, so the trace's later ticks do not apply here). ``return_token_ids`` asks
for each chunk's token ids (fs-engine and vLLM both support it): the next turn's prompt holds the reply's
exact tokens, and each token is timestamped when its chunk arrives. Engine counters come from ``/metrics``
(``fs_engine:*`` or ``vllm:*`` names), before and after the run.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fs_engine.bench.driver import Progress, RunResult, _ConversationState, _counters_since, _record
from fs_engine.bench.metrics import RequestRecord
from fs_engine.bench.workload import Trace

METRICS_SETTLE_S = 1.5  # servers update some counters periodically (fs-engine serve polls its engine every second)

# /metrics counter -> the engine counter name the reports use
_METRICS = {
    "fs_engine:prompt_tokens_total": "num_prompt_tokens", "vllm:prompt_tokens_total": "num_prompt_tokens",
    "fs_engine:generation_tokens_total": "num_generated_tokens",
    "vllm:generation_tokens_total": "num_generated_tokens",
    "fs_engine:num_preemptions_total": "num_preemptions", "vllm:num_preemptions_total": "num_preemptions",
    "fs_engine:swap_outs_total": "num_swap_outs", "fs_engine:swap_ins_total": "num_swap_ins",
    "fs_engine:swap_out_bytes_total": "swap_out_bytes", "fs_engine:swap_in_bytes_total": "swap_in_bytes",
    "fs_engine:swap_seconds_total": "swap_s", "fs_engine:swap_commands_total": "swap_commands",
    "fs_engine:reused_prefix_tokens_total": "reused_prefix_tokens",
    "vllm:prefix_cache_hits_total": "reused_prefix_tokens",  # prompt tokens whose KV vLLM's prefix cache held
    "fs_engine:reused_device_tokens_total": "reused_resident_tokens",
    "fs_engine:recomputed_tokens_total": "num_recomputed_tokens",
    "fs_engine:request_success_total": "num_finished_requests",
}


def run_against_http(base_url: str, trace: Trace, model: str | None = None, api_key: str | None = None,
                     progress: bool | None = None, timeout_s: float = 600.0) -> RunResult:
    try:
        import httpx  # noqa: F401
    except ImportError as e:
        raise ValueError("--base-url needs httpx: pip install 'fs-engine[bench]'") from e
    return asyncio.run(_replay(base_url.rstrip("/"), trace, model, api_key,
                               Progress(trace.num_requests, "http replay", progress), timeout_s))


async def _counters(http: Any, base_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    try:
        reply = await http.get(f"{base_url}/metrics")
    except Exception:  # noqa: BLE001 - a server without /metrics: the run's records still stand
        return {}
    if reply.status_code != 200:
        return {}
    counters: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            name = _METRICS.get(sample.name)
            if name is not None:
                counters[name] = counters.get(name, 0.0) + sample.value
    return counters


async def _model(http: Any, base_url: str, model: str | None) -> str:
    if model is not None:
        return model
    reply = await http.get(f"{base_url}/v1/models")
    reply.raise_for_status()
    return reply.json()["data"][0]["id"]


async def _replay(base_url: str, trace: Trace, model: str | None, api_key: str | None, bar: Progress,
                  timeout_s: float) -> RunResult:
    import httpx

    records: list[RequestRecord] = []
    rejected: list[str] = []
    replies: dict[str, list[int]] = {}
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start  # noqa: E731
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=timeout_s, headers=headers, limits=limits) as http:
        model = await _model(http, base_url, model)
        before = await _counters(http, base_url)

        async def turn(state: _ConversationState) -> bool:
            conv, turn = state.conv, state.conv.turns[state.next_turn]
            request_id, prompt, now = state.request_id(), state.prompt(), clock()
            record = _record(state, request_id, now, prompt)
            body = {"model": model, "prompt": prompt, "max_tokens": turn.reply_tokens, "temperature": 0,
                    "stream": True, "ignore_eos": True, "return_token_ids": True, "user": conv.tenant,
                    "priority": trace.priority_at(conv, now)}
            reply: list[int] = []
            async with http.stream("POST", f"{base_url}/v1/completions", json=body) as response:
                if response.status_code != 200:
                    rejected.append(f"{request_id}: HTTP {response.status_code} {(await response.aread())[:200]!r}")
                    return False
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        rejected.append(f"{request_id}: {chunk['error'].get('message')}")
                        return False
                    for choice in chunk.get("choices", []):
                        ids = choice.get("token_ids")
                        if ids is None:
                            raise ValueError(f"{base_url} sends no token_ids: it must support return_token_ids")
                        t = clock()
                        reply += ids
                        record.token_times += [t] * len(ids)
                        record.finish_reason = choice.get("finish_reason") or record.finish_reason
            records.append(record)
            replies[request_id] = reply
            bar.update(len(records))
            state.finish_turn(prompt, reply, clock())
            return True

        async def conversation(state: _ConversationState) -> None:
            await asyncio.sleep(max(0.0, state.ready_at - clock()))
            while not state.done and await turn(state):
                if not state.done:
                    await asyncio.sleep(max(0.0, state.ready_at - clock()))

        await asyncio.gather(*(conversation(_ConversationState(c)) for c in trace.conversations))
        duration = clock()
        await asyncio.sleep(METRICS_SETTLE_S)
        after = await _counters(http, base_url)
    bar.close(len(records))
    return RunResult(sorted(records, key=lambda r: r.sent_s), duration, _counters_since(before, after), rejected,
                     replies)
