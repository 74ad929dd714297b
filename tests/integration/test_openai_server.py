"""``fs-engine serve`` through the real ``openai`` package: greedy output identical to the offline ``LLM``,
streaming and not, completions and chat, sync and async; many tenants at once; errors in OpenAI's shape with
the documented status codes; API keys; a disconnect frees its KV; /metrics parses and adds up."""

from __future__ import annotations

import asyncio
import json
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from fs_engine import LLM, SamplingParams  # noqa: E402
from tests.launcher import ROOT  # noqa: E402

FLAGS = {"block_size": 4, "num_gpu_blocks": 512, "policy": "vtc"}
PROMPTS = ["The fair share of", "Swap the blocks", "Once upon a time", "def fibonacci(n):"]
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Explain preemption."}]


class Served:
    """One ``python -m fs_engine serve`` process on a free port."""

    def __init__(self, model: Path, log: Path, *extra: str, **flags: object) -> None:
        argv = [sys.executable, "-m", "fs_engine", "serve", str(model), "--port", "0", *extra]
        for name, value in {**FLAGS, **flags}.items():
            argv += ["--" + name.replace("_", "-"), str(value)]
        self.log = log
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=log.open("w"), text=True)
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        line = self.proc.stdout.readline() if selector.select(240) else ""
        if "fs-engine serve ready at" not in line:
            self.proc.kill()
            pytest.fail(f"no ready line ({line!r}); stderr:\n{log.read_text()[-3000:]}")
        self.url = line.split("ready at ")[1].split()[0]
        self.model = Path(model).name

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name and labels, e.g. ``fs_engine:num_requests_running``."""
        text = httpx.get(f"{self.url}/metrics").text
        return {s.name + (json.dumps(s.labels, sort_keys=True) if s.labels else ""): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


@pytest.fixture(scope="module")
def model(tiny_model_dirs):
    return tiny_model_dirs["qwen2"]


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    server = Served(model, tmp_path_factory.mktemp("serve") / "stderr.log")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="module")
def offline(model):
    llm = LLM(model, **FLAGS)
    tokenizer = llm.tokenizer
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    texts = {p: o.text for p, o in zip(PROMPTS, llm.generate(PROMPTS, params))}
    chat_ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    chat = llm.generate([chat_ids], params)[0].text
    return texts, chat


def _client(served, key: str = "none"):
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=key, max_retries=0)


GREEDY = {"max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}


def test_completions_and_chat_match_the_offline_engine(served, offline):
    texts, chat = offline
    client = _client(served)
    for prompt, expected in texts.items():
        out = client.completions.create(model=served.model, prompt=prompt, **GREEDY)
        assert out.choices[0].text == expected and out.choices[0].finish_reason == "length"
        assert out.usage.completion_tokens == 12 and out.usage.prompt_tokens > 0
    out = client.chat.completions.create(model=served.model, messages=MESSAGES, **GREEDY)
    assert out.choices[0].message.content == chat and out.choices[0].message.role == "assistant"


def test_streaming_completions_and_chat_match_and_end_with_usage(served, offline):
    texts, chat = offline
    client = _client(served)
    prompt = PROMPTS[0]
    chunks = list(client.completions.create(model=served.model, prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == texts[prompt]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(model=served.model, messages=MESSAGES, stream=True, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat
    assert chunks[0].choices[0].delta.role == "assistant"


def test_logprobs_in_both_openai_shapes_match_the_offline_engine(served, model):
    """Completions' legacy lists and chat's content list, whole and streamed, carry the offline engine's
    logprobs, token texts and top alternatives."""
    llm = LLM(model, **FLAGS)
    tokenizer = llm.tokenizer
    prompt_ids = list(tokenizer(PROMPTS[2]).input_ids)
    offline = llm.generate([prompt_ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                        logprobs=3))[0]
    texts = [tokenizer.decode([t]) for t in offline.token_ids]
    client = _client(served)

    out = client.completions.create(model=served.model, prompt=PROMPTS[2], logprobs=3, **GREEDY).choices[0]
    lp = out.logprobs
    assert lp.tokens == texts and "".join(lp.tokens) == out.text
    assert lp.token_logprobs == pytest.approx([e[t] for t, e in zip(offline.token_ids, offline.logprobs)], abs=1e-5)
    assert lp.text_offset == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    for top, entry in zip(lp.top_logprobs, offline.logprobs):
        best = sorted(entry.items(), key=lambda item: -item[1])[:3]
        assert top == pytest.approx({tokenizer.decode([t]): v for t, v in best}, abs=1e-5)
    chunks = list(client.completions.create(model=served.model, prompt=PROMPTS[2], logprobs=3, stream=True, **GREEDY))
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == texts

    chat_ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    chat_ids = list(chat_ids["input_ids"] if hasattr(chat_ids, "keys") else chat_ids)
    chat_offline = llm.generate([chat_ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                           logprobs=2))[0]
    reply = client.chat.completions.create(model=served.model, messages=MESSAGES, logprobs=True, top_logprobs=2,
                                           **GREEDY).choices[0]
    content = reply.logprobs.content
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in chat_offline.token_ids]
    for item, token, entry in zip(content, chat_offline.token_ids, chat_offline.logprobs):
        assert item.logprob == pytest.approx(entry[token], abs=1e-5)
        assert bytes(item.bytes).decode("utf-8") == item.token and len(item.top_logprobs) == 2
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
    streamed = [c for chunk in client.chat.completions.create(model=served.model, messages=MESSAGES, logprobs=True,
                                                              stream=True, **GREEDY)
                for c in (chunk.choices[0].logprobs.content if chunk.choices[0].logprobs else [])]
    assert [c.token for c in streamed] == [c.token for c in content] and all(not c.top_logprobs for c in streamed)
    plain = client.chat.completions.create(model=served.model, messages=MESSAGES, **GREEDY).choices[0]
    assert plain.logprobs is None
    bad = httpx.post(f"{served.url}/v1/chat/completions", json={"messages": MESSAGES, "top_logprobs": 2})
    assert bad.status_code == 400 and "top_logprobs needs logprobs" in bad.json()["error"]["message"]


def test_n_choices_are_seeded_requests_of_their_own(served, model):
    """n=3 gives three choices, choice i sampled with seed + i as the offline engine samples it; whole and
    streamed (each chunk naming its choice), completions and chat, the usage counting every choice's tokens."""
    llm = LLM(model, **FLAGS)
    prompt_ids = list(llm.tokenizer(PROMPTS[0]).input_ids)
    sampled = {"max_tokens": 10, "temperature": 1.0, "ignore_eos": True}
    expected = [o.token_ids for o in llm.generate([prompt_ids] * 3, [SamplingParams(seed=40 + i, **sampled)
                                                                      for i in range(3)])]
    assert len({tuple(e) for e in expected}) > 1  # (the seeds make them differ)
    client = _client(served)
    extra = {"ignore_eos": True, "return_token_ids": True}
    out = client.completions.create(model=served.model, prompt=PROMPTS[0], n=3, seed=40, max_tokens=10,
                                    temperature=1.0, extra_body=extra)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert [c.token_ids for c in out.choices] == expected
    assert out.usage.completion_tokens == 30
    chunks = list(client.completions.create(model=served.model, prompt=PROMPTS[0], n=3, seed=40, max_tokens=10,
                                            temperature=1.0, stream=True, stream_options={"include_usage": True},
                                            extra_body=extra))
    streamed = {i: [t for c in chunks for ch in c.choices if ch.index == i for t in ch.token_ids] for i in range(3)}
    assert [streamed[i] for i in range(3)] == expected
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["length"] * 3 and chunks[-1].usage.completion_tokens == 30
    chat = client.chat.completions.create(model=served.model, messages=MESSAGES, n=2, **GREEDY)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content
    roles = [ch.index for c in client.chat.completions.create(model=served.model, messages=MESSAGES, n=2, stream=True,
                                                              **GREEDY) for ch in c.choices if ch.delta.role]
    assert sorted(roles) == [0, 1]  # each choice's first chunk names the role


def test_penalties_reach_the_engine(served, model):
    """OpenAI's presence and frequency penalties and vLLM's repetition_penalty give the offline engine's tokens."""
    llm = LLM(model, **FLAGS)
    prompt_ids = list(llm.tokenizer(PROMPTS[3]).input_ids)
    penalties = {"presence_penalty": 0.5, "frequency_penalty": 1.5, "repetition_penalty": 1.3}
    offline = llm.generate([prompt_ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, **penalties))
    client = _client(served)
    out = client.completions.create(model=served.model, prompt=PROMPTS[3], presence_penalty=0.5,
                                    frequency_penalty=1.5, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True, "repetition_penalty": 1.3,
                                                "return_token_ids": True})
    assert out.choices[0].token_ids == offline[0].token_ids


def test_64_concurrent_streams_of_four_tenants_all_match(served, offline):
    texts, _ = offline

    async def one(client, i: int) -> tuple[str, str]:
        prompt = PROMPTS[i % len(PROMPTS)]
        stream = await client.completions.create(model=served.model, prompt=prompt, stream=True,
                                                 user=f"tenant{i % 4}", **GREEDY)
        return prompt, "".join([c.choices[0].text async for c in stream if c.choices])

    async def main() -> list[tuple[str, str]]:
        async with openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key="none", max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    assert all(text == texts[prompt] for prompt, text in asyncio.run(main()))
    time.sleep(2.5)  # the server polls the engine's counters once a second
    metrics = served.metrics()
    assert all(metrics.get(f'fs_engine:tenant_service_tokens_total{{"tenant": "tenant{t}"}}', 0) > 0
               for t in range(4))  # each tenant (the user field) was served as itself


@pytest.mark.parametrize("body,status,param", [
    ({"prompt": "x", "n": 17}, 400, "n"),
    ({"prompt": "x", "n": 0}, 400, "n"),
    ({"prompt": "x", "frobnicate": True}, 400, "frobnicate"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "max_tokens": 100_000}, 400, None),  # over max_model_len: the engine's reason
])
def test_bad_requests_get_openai_errors_and_the_server_serves_on(served, offline, body, status, param):
    reply = httpx.post(f"{served.url}/v1/completions", json=body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["message"] and (param is None or param in (error["param"] or "") or param in error["message"])
    out = _client(served).completions.create(model=served.model, prompt=PROMPTS[1], **GREEDY)
    assert out.choices[0].text == offline[0][PROMPTS[1]]


def _aborted_since(served, before: tuple[float, float]) -> dict[str, float]:
    """/metrics once the engine has aborted the abandoned requests and runs none (within 20 s, or the test
    fails): more aborted than ``before`` and no more finished (none of them ran to its end)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        m = served.metrics()
        if (m.get("fs_engine:request_aborted_total", 0) > before[0] and m["fs_engine:num_requests_running"] == 0
                and m.get("fs_engine:request_success_total", 0) == before[1]):
            return m
        time.sleep(0.3)
    pytest.fail(f"the abandoned requests still run, or ran to their end: {served.metrics()}")


def _aborted_so_far(served) -> tuple[float, float]:
    time.sleep(1.5)  # the server polls the engine's counters once a second
    m = served.metrics()
    return m.get("fs_engine:request_aborted_total", 0), m.get("fs_engine:request_success_total", 0)


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_disconnects_mid_stream_frees_its_kv(served, n):
    before = _aborted_so_far(served)
    with httpx.stream("POST", f"{served.url}/v1/completions",
                      json={"prompt": "A long story", "max_tokens": 400, "ignore_eos": True, "stream": True,
                            "n": n}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk in, then hang up
    assert _aborted_since(served, before)["fs_engine:kv_cache_usage_perc"] < 1.0


@pytest.mark.parametrize("n", [1, 3])
def test_a_client_that_gives_up_on_a_non_streaming_request_frees_its_kv(served, n):
    before = _aborted_so_far(served)
    # it hangs up after 0.3 s, long before the 2,000 tokens (over 1.5 s even on a fast machine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/completions", json={"prompt": "A long story", "max_tokens": 2000,
                                                          "ignore_eos": True, "n": n}, timeout=0.3)
    assert _aborted_since(served, before)["fs_engine:kv_cache_usage_perc"] < 1.0


def test_metrics_parse_and_add_up_to_the_requests_served(model, tmp_path):
    server = Served(model, tmp_path / "stderr.log")
    try:
        client = _client(server)
        outs = [client.completions.create(model=server.model, prompt=p, **GREEDY) for p in PROMPTS]
        time.sleep(2.5)  # the server polls the engine's counters once a second
        m = server.metrics()
        assert m["fs_engine:generation_tokens_total"] == sum(o.usage.completion_tokens for o in outs)
        assert m["fs_engine:request_success_total"] == len(PROMPTS)
        assert m['fs_engine:time_to_first_token_seconds_count{"tenant": "default"}'] == len(PROMPTS)
        assert m['fs_engine:e2e_request_latency_seconds_count{"tenant": "default"}'] == len(PROMPTS)
        assert m["fs_engine:num_requests_running"] == m["fs_engine:num_requests_waiting"] == 0
        assert httpx.get(f"{server.url}/health").status_code == 200
        assert httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"] == server.model
    finally:
        assert server.stop() == 0


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="no prometheus server here (apt install prometheus)")
def test_a_real_prometheus_server_scrapes_the_counters(served, tmp_path):
    """Prometheus itself (Debian's package) scrapes /metrics every second; its view of the counters ends equal
    to the server's own, and the target is up with every fs_engine family ingested."""
    url = httpx.URL(served.url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"scrape_configs: [{{job_name: fs-engine, static_configs: [{{targets: ['{url.host}:{url.port}']}}]}}]\n")
    prom = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("w"))
    api = f"http://127.0.0.1:{port}/api/v1"

    def query(expr: str) -> list:
        try:
            reply = httpx.get(f"{api}/query", params={"query": expr}, timeout=5)
        except httpx.TransportError:
            return []  # not listening yet
        return reply.json()["data"]["result"] if reply.status_code == 200 else []

    try:
        client = _client(served)
        outs = [client.completions.create(model=served.model, prompt=p, **GREEDY) for p in PROMPTS]
        assert all(o.usage.completion_tokens == 12 for o in outs)
        time.sleep(2.5)  # the server polls the engine's counters once a second
        want = served.metrics()["fs_engine:generation_tokens_total"]
        deadline, seen = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            result = query("fs_engine:generation_tokens_total")
            seen = float(result[0]["value"][1]) if result else None
            if seen == want:
                break
            time.sleep(0.5)
        assert seen == want, f"prometheus sees {seen}, the server says {want}; log:\n{(tmp_path / 'prometheus.log').read_text()[-2000:]}"
        assert [float(r["value"][1]) for r in query('up{job="fs-engine"}')] == [1.0]
        names = httpx.get(f"{api}/label/__name__/values").json()["data"]
        for family in ("fs_engine:num_requests_running", "fs_engine:time_to_first_token_seconds_bucket",
                       "fs_engine:kv_cache_usage_perc", "fs_engine:num_preemptions_total"):
            assert family in names, family
        # a dashboard's query: the median TTFT from the histogram's buckets, as PromQL computes it
        median = query("histogram_quantile(0.5, sum by (le) (fs_engine:time_to_first_token_seconds_bucket))")
        assert median and 0 < float(median[0]["value"][1]) < 60
    finally:
        prom.terminate()
        prom.wait(30)


def test_api_keys_name_the_tenant_and_limits_answer_429(model, tmp_path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"tenants": {"alice": {"weight": 2, "api_keys": ["sk-alice-0123456789abcdef"]},
                                            "bob": {"api_keys": ["sk-bob-0123456789abcdefgh"]}}}))
    server = Served(model, tmp_path / "stderr.log", "--api-keys", str(keys), max_requests_per_tenant=2)
    try:
        for key in (None, "sk-wrong-0123456789abcdef"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            reply = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}, headers=headers)
            assert reply.status_code == 401 and reply.json()["error"]["type"] == "authentication_error"
        alice = {"Authorization": "Bearer sk-alice-0123456789abcdef"}
        long = {"prompt": "A long story", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as http:
            streams = [http.stream("POST", f"{server.url}/v1/completions", json=long, headers=alice)
                       for _ in range(2)]
            responses = [s.__enter__() for s in streams]
            lines = [r.iter_lines() for r in responses]  # (held: a dropped iterator closes its response)
            for r, line in zip(responses, lines):
                assert r.status_code == 200
                next(line)
            over = http.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers=alice)
            assert over.status_code == 429 and "max_requests_per_tenant" in over.json()["error"]["message"]
            assert over.headers["Retry-After"] == "1"
            bob = _client(server, "sk-bob-0123456789abcdefgh").completions.create(
                model=server.model, prompt="y", max_tokens=2)  # another tenant is not limited by alice
            assert bob.usage.completion_tokens == 2
            for s in streams:
                s.__exit__(None, None, None)
        time.sleep(2.5)
        m = server.metrics()
        assert m.get('fs_engine:tenant_service_tokens_total{"tenant": "bob"}', 0) > 0
        assert 'fs_engine:tenant_service_tokens_total{"tenant": "default"}' not in m
    finally:
        assert server.stop() == 0


def test_the_benchmark_replays_through_http_as_through_the_sdk(model, served):
    """``fs-engine bench run --base-url``: the same conversations, token for token, as the in-process replay."""
    from fs_engine.bench.driver import run_in_process
    from fs_engine.bench.http_driver import run_against_http
    from fs_engine.bench.workload import WorkloadConfig, generate
    from fs_engine.engine.llm_engine import LLMEngine

    trace = generate(WorkloadConfig(num_conversations=5, request_rate=20.0, scale=0.04, max_context=160, seed=5))
    engine = LLMEngine(model, **FLAGS)
    try:
        local = run_in_process(engine, trace, progress=False)
    finally:
        engine.shutdown()
    over_http = run_against_http(served.url, trace, progress=False, timeout_s=120)
    assert not over_http.rejected and over_http.replies == local.replies
    assert len(over_http.records) == trace.num_requests
    assert over_http.engine_stats["num_generated_tokens"] == sum(len(r) for r in local.replies.values())
    for record in over_http.records:
        assert len(record.token_times) == len(over_http.replies[record.request_id]) > 0
        assert record.token_times == sorted(record.token_times) and record.token_times[0] >= record.sent_s
