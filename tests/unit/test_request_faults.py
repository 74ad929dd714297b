"""Faults stay with their request: an exception while scheduling, applying a result, checking stop rules or
detokenizing one request fails that request (``finish_reason="error"``, a short reason with an error id, its KV
freed) and every other request's greedy output is what it would have been."""

from __future__ import annotations

import pytest

from fs_engine import LLMEngine, SamplingParams
from fs_engine.request import RequestStatus
from fs_engine.tokenizer import IncrementalDetokenizer
from tests.conftest import random_prompts

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
IDS = [f"r{i}" for i in range(5)]
BAD = "r2"


def _engine(tiny_model_dirs, **kwargs) -> LLMEngine:
    # a KV cache small enough that requests are preempted and swapped while the fault happens
    args = dict(num_gpu_blocks=24, block_size=4, max_num_seqs=4, policy="vtc")
    return LLMEngine(tiny_model_dirs["qwen2"], **{**args, **kwargs})


def _run(engine: LLMEngine) -> dict:
    for rid, prompt in zip(IDS, random_prompts(512, [9, 14, 6, 11, 17], seed=3)):
        engine.add_request(rid, prompt, GREEDY, tenant=f"t{rid[-1]}")
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
    return outputs


@pytest.fixture(scope="module")
def expected(tiny_model_dirs):
    return {rid: out.token_ids for rid, out in _run(_engine(tiny_model_dirs)).items()}


def _check_failed_alone(engine: LLMEngine, outputs: dict, expected: dict) -> None:
    bad = outputs[BAD]
    assert bad.finish_reason == "error" and "internal error" in bad.error and "log" in bad.error
    assert "injected" not in bad.error  # the reason stays in the log
    assert {rid: out.token_ids for rid, out in outputs.items() if rid != BAD} == {
        rid: t for rid, t in expected.items() if rid != BAD}
    assert all(out.error is None and out.finish_reason == "length" for rid, out in outputs.items() if rid != BAD)
    assert not engine.scheduler.requests and not engine.kv.holds(BAD)
    engine.scheduler.check_invariants()
    assert engine.stats()["num_failed_requests"] == 1
    # and the engine serves on: the same request id runs again, to the same tokens as before
    engine.add_request("again", random_prompts(512, [9], seed=3)[0], GREEDY, tenant="t0")
    again = []
    while engine.has_unfinished_requests():
        again += engine.step()
    assert again[-1].token_ids == expected["r0"]


def test_a_fault_while_scheduling_fails_that_request_alone(tiny_model_dirs, expected, monkeypatch, caplog):
    engine = _engine(tiny_model_dirs)
    calls = {"n": 0}
    original = type(engine.scheduler)._add_chunk

    def add_chunk(self, plan, request, num_new, table):
        if request.request_id == BAD and request.num_computed_tokens > 0:  # mid-run, with KV on the device
            calls["n"] += 1
            raise RuntimeError("injected fault")
        return original(self, plan, request, num_new, table)

    monkeypatch.setattr(type(engine.scheduler), "_add_chunk", add_chunk)
    outputs = _run(engine)
    assert calls["n"] == 1
    _check_failed_alone(engine, outputs, expected)
    assert "injected fault" in caplog.text and "Traceback" in caplog.text  # the operator's log has it all


def test_a_fault_while_applying_a_result_fails_that_request_alone(tiny_model_dirs, expected, monkeypatch):
    engine = _engine(tiny_model_dirs)
    policy = engine.scheduler.policy
    original = policy.on_served

    def on_served(request, prompt_tokens, output_tokens):
        if request.request_id == BAD and request.num_output_tokens == 3:
            raise RuntimeError("injected fault")
        return original(request, prompt_tokens, output_tokens)

    monkeypatch.setattr(policy, "on_served", on_served)
    _check_failed_alone(engine, _run(engine), expected)


@pytest.mark.parametrize("method", ["append", "flush"])
def test_a_fault_while_detokenizing_fails_that_request_alone(tiny_model_dirs, expected, monkeypatch, method):
    engine = _engine(tiny_model_dirs)
    bad_detok = {}
    original_add = engine.add_request

    def add_request(request_id, *args, **kwargs):
        original_add(request_id, *args, **kwargs)
        if request_id == BAD:
            bad_detok["d"] = engine._detokenizers[request_id]

    original = getattr(IncrementalDetokenizer, method)

    def patched(self, *args):
        if self is bad_detok.get("d"):
            raise RuntimeError("injected fault")
        return original(self, *args)

    monkeypatch.setattr(engine, "add_request", add_request)
    monkeypatch.setattr(IncrementalDetokenizer, method, patched)
    _check_failed_alone(engine, _run(engine), expected)


def test_a_failed_request_is_not_written_back_for_reuse(tiny_model_dirs, monkeypatch):
    """Its KV may be half-computed: it is freed, never offered to a later turn."""
    engine = _engine(tiny_model_dirs, enable_kv_reuse=True)
    original = type(engine.scheduler)._add_chunk

    def add_chunk(self, plan, request, num_new, table):
        if request.request_id == "bad" and request.num_computed_tokens >= 8:
            raise RuntimeError("injected fault")
        return original(self, plan, request, num_new, table)

    monkeypatch.setattr(type(engine.scheduler), "_add_chunk", add_chunk)
    engine.add_request("bad", list(range(1, 13)), GREEDY, session_id="s")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].finish_reason == "error"
    assert engine.scheduler.num_swap_outs == 0 and engine.cpu_store.num_cached_blocks() == 0
    assert RequestStatus.FINISHED_ERROR.finish_reason == "error"


@pytest.mark.parametrize("where", ["scheduling", "streaming"])
def test_through_the_server_the_failed_request_gets_an_error_and_the_others_their_tokens(
        tiny_model_dirs, expected, monkeypatch, tmp_path, where):
    import threading

    from fs_engine.client import Client
    from fs_engine.engine.server import FrontendServer
    from ipc.errors import RemoteError

    engine = _engine(tiny_model_dirs)
    if where == "scheduling":
        original = type(engine.scheduler)._add_chunk

        def add_chunk(self, plan, request, num_new, table):
            if request.request_id.endswith("/" + BAD) and request.num_computed_tokens > 0:
                raise RuntimeError("injected fault")
            return original(self, plan, request, num_new, table)

        monkeypatch.setattr(type(engine.scheduler), "_add_chunk", add_chunk)
    else:
        original_stream = FrontendServer._stream

        def stream(self, pending, out):
            if pending.client_id == BAD and len(out.token_ids) == 4:
                raise RuntimeError("injected fault")
            return original_stream(self, pending, out)

        monkeypatch.setattr(FrontendServer, "_stream", stream)
    server = FrontendServer(engine, f"ipc://{tmp_path / 'frontend'}")
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    try:
        client = Client(server.address, timeout_s=60)
        prompts = random_prompts(512, [9, 14, 6, 11, 17], seed=3)
        streams = {rid: client.generate(p, max_tokens=12, temperature=0, ignore_eos=True, request_id=rid,
                                        tenant=f"t{rid[-1]}") for rid, p in zip(IDS, prompts)}
        got = {}
        for rid, stream in streams.items():
            if rid == BAD:
                with pytest.raises(RemoteError, match="internal error [0-9a-f]{12}.*failed"):
                    list(stream)
            else:
                got[rid] = [t for ev in stream for t in ev.token_ids]
        assert got == {rid: t for rid, t in expected.items() if rid != BAD}
        stats = client.stats()
        assert stats["num_failed_requests" if where == "scheduling" else "num_aborted_requests"] == 1
        assert stats["num_running"] == stats["num_waiting"] == 0
        client.close()
    finally:
        server.request_stop()
        thread.join(timeout=30)
    assert not engine.scheduler.requests
