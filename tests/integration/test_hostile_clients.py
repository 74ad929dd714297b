"""Hostile and careless clients against a real ``fs-engine launch``: no frame or field takes the engine down;
each gets an error that says what is wrong, and a bystander's greedy output is unchanged."""

from __future__ import annotations

import signal
import time

import msgpack
import pytest
import zmq

from fs_engine import LLM, SamplingParams
from fs_engine.client import Client
from ipc.codec import MAX_DEPTH, decode, encode
from ipc.messages import PROTOCOL_VERSION, ErrorReply, GenerateRequest
from tests.integration.test_launch import raw_request as reply_to
from tests.launcher import ENGINE_FLAGS, Launched

BYSTANDER = [5, 6, 7, 8, 9, 10]


@pytest.fixture(scope="module")
def model(tiny_model_dirs):
    return tiny_model_dirs["qwen3"]


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    launched = Launched(model, tmp_path_factory.mktemp("hostile") / "stderr.log")
    yield launched
    launched.stop(signal.SIGKILL)


@pytest.fixture(scope="module")
def bystander_tokens(model):
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    return LLM(model, **ENGINE_FLAGS).generate(BYSTANDER, params)[0].token_ids


def assert_still_serving(server, bystander_tokens) -> None:
    assert server.proc.poll() is None, "the engine died"
    with Client(server.address, timeout_s=30) as client:
        result = client.complete(BYSTANDER, max_tokens=12, temperature=0, ignore_eos=True)
    assert result.token_ids == bystander_tokens


def nested(depth: int) -> bytes:
    """A frame whose message nests ``depth`` messages deep (each an ext value inside the last's fields)."""
    body = msgpack.packb(["StatsRequest", ["x"]])
    for _ in range(depth):
        body = msgpack.packb(["StatsRequest", [msgpack.ExtType(1, body)]])
    return msgpack.packb([PROTOCOL_VERSION, msgpack.ExtType(1, body)])


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 200, 5000])
def test_deeply_nested_frames_are_refused_without_a_crash(server, bystander_tokens, depth):
    reply = reply_to(server.address, nested(depth))
    assert isinstance(reply, ErrorReply) and "nested" in reply.message
    assert_still_serving(server, bystander_tokens)


def generate(params: dict, **fields) -> bytes:
    return encode(GenerateRequest("hostile", None, prompt_token_ids=[3, 4, 5], params={"max_tokens": 4, **params},
                                  **fields))


@pytest.mark.parametrize("payload,says", [
    (generate({"top_k": 2 ** 63}), "top_k"),
    (generate({"top_k": 2 ** 40}), "top_k"),
    (generate({"stop_token_ids": [float("inf")]}), "stop_token_ids"),
    (generate({"stop_token_ids": "abc"}), "stop_token_ids"),
    (generate({"temperature": float("nan")}), "temperature"),
    (generate({"seed": -5}), "seed"),
    (generate({"max_tokens": 2 ** 40}), "max_tokens"),
    (generate({"stop": ["x"] * 1000}), "stop strings"),
    (generate({"ignore_eos": "yes"}), "ignore_eos"),
    (generate({}, session_id=["not", "hashable"]), "session_id"),
    (generate({}, session_id={"a": 1}), "session_id"),
    (generate({}, priority=2 ** 62), "priority"),
    (generate({}, priority=True), "priority"),
    (generate({}, tenant=7), "tenant"),
    (generate({}, tenant=""), "tenant"),
    (generate({}, stream="sometimes"), "stream"),
])
def test_one_bad_field_gets_an_error_naming_it_and_the_engine_serves_on(server, bystander_tokens, payload, says):
    reply = reply_to(server.address, payload)
    assert isinstance(reply, ErrorReply) and not reply.fatal, reply
    assert says in reply.message
    assert_still_serving(server, bystander_tokens)


def test_a_frame_over_the_size_limit_is_dropped_and_stalls_nobody(server, bystander_tokens):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    try:
        sock.send(b"\x00" * (40 << 20))  # libzmq cuts the connection at the limit: no reply, no buffering
        assert_still_serving(server, bystander_tokens)
    finally:
        sock.close()


# ---- limits and backpressure -----------------------------------------------------------------------------
LIMITS = {"max_requests_per_client": 8, "max_prompt_bytes": 2000, "max_queued_messages": 300}


@pytest.fixture(scope="module")
def tight(model, tmp_path_factory):
    launched = Launched(model, tmp_path_factory.mktemp("tight") / "stderr.log", **LIMITS)
    yield launched
    launched.stop(signal.SIGKILL)


def raw_client(address: str):
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 10)  # a client that does not read fills up fast: few messages in its queue,
    sock.setsockopt(zmq.RCVBUF, 4096)  # and little room in its kernel buffer
    sock.connect(address)
    return sock


def test_a_flood_from_one_client_is_refused_past_its_limit_and_others_are_served(tight, bystander_tokens):
    sock = raw_client(tight.address)
    try:
        for i in range(200):
            sock.send(encode(GenerateRequest(f"f{i}", None, prompt_token_ids=[3, 4, 5, 6],
                                             params={"max_tokens": 40, "temperature": 0, "ignore_eos": True})))
        refused = 0
        deadline = time.monotonic() + 30
        while refused < 192 and time.monotonic() < deadline:
            if sock.poll(1000):
                reply = decode(sock.recv())
                refused += isinstance(reply, ErrorReply) and "max_requests_per_client" in reply.message
        assert refused == 192  # 8 in flight, every other one told which limit it hit
        assert_still_serving(tight, bystander_tokens)
    finally:
        sock.close()


def test_a_huge_text_prompt_is_refused_before_it_is_tokenized(tight, bystander_tokens):
    reply = reply_to(tight.address, encode(GenerateRequest("big", "word " * 10_000, params={"max_tokens": 2})))
    assert isinstance(reply, ErrorReply) and "max_prompt_bytes" in reply.message
    assert_still_serving(tight, bystander_tokens)


def test_a_client_that_reads_late_still_gets_every_token(tight):
    sock = raw_client(tight.address)
    try:
        for i in range(4):
            sock.send(encode(GenerateRequest(f"late{i}", None, prompt_token_ids=[3, 4, 5, 6 + i],
                                             params={"max_tokens": 30, "temperature": 0, "ignore_eos": True})))
        time.sleep(3)  # nothing read meanwhile: its queue fills, which is not a disconnect
        tokens = {f"late{i}": [] for i in range(4)}
        done = set()
        while len(done) < 4:
            assert sock.poll(30_000), "the stream stalled"
            event = decode(sock.recv())
            if type(event).__name__ == "TokenEvent":
                tokens[event.request_id] += event.token_ids
                if event.finished:
                    done.add(event.request_id)
        assert all(len(t) == 30 for t in tokens.values())
    finally:
        sock.close()


def test_a_stream_of_random_frames_leaves_the_engine_serving_and_no_kv_leaked(server, bystander_tokens):
    import random

    rng = random.Random(14)
    valid = encode(GenerateRequest("fz", None, prompt_token_ids=[3, 4, 5], params={"max_tokens": 3}))
    frames = []
    for i in range(600):
        kind = i % 4
        if kind == 0:
            frames.append(rng.randbytes(rng.randrange(0, 200)))
        elif kind == 1:
            frames.append(valid[: rng.randrange(len(valid))])
        elif kind == 2:
            mutated = bytearray(valid)
            mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            frames.append(bytes(mutated))
        else:
            frames.append(nested(rng.randrange(1, 300)))
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server.address)
    try:
        for frame in frames:
            sock.send(frame)
        replies, deadline = 0, time.monotonic() + 30
        while replies < len(frames) and time.monotonic() < deadline:
            if sock.poll(500):
                decode(sock.recv())  # every reply is a well-formed message
                replies += 1
        assert replies >= len(frames) * 0.9  # (a mutated frame may be a valid request whose events also come)
    finally:
        sock.close()
    assert_still_serving(server, bystander_tokens)
    deadline = time.monotonic() + 30
    # (finished turns' write-backs to the CPU store hold their blocks until they land)
    while ((stats := server.stats())["num_running"] or stats["num_waiting"] or stats["num_swapped"]
           or stats["num_swaps_in_flight"] or stats["num_free_gpu_blocks"] != stats["num_gpu_blocks"]):
        assert time.monotonic() < deadline, f"KV blocks leaked: {stats}"
        time.sleep(0.2)
