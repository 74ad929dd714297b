"""End to end through ``fs-engine launch``: a real frontend process with its worker and swap processes, reached
only through the client SDK and raw sockets, as a user would."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import zmq

from fs_engine import LLM, SamplingParams
from fs_engine.client import Client
from ipc.codec import decode, encode
from ipc.errors import EngineDeadError, RemoteError
from ipc.messages import ErrorReply, GenerateRequest, StatsReply, StatsRequest
from tests.conftest import random_prompts
from tests.launcher import ENGINE_FLAGS, Launched, alive, run_dirs, wait_until


@pytest.fixture(scope="module")
def model(tiny_model_dirs):
    return tiny_model_dirs["qwen2"]  # has a tokenizer, so text streams too


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    launched = Launched(model, tmp_path_factory.mktemp("launch") / "stderr.log")
    yield launched
    launched.stop(signal.SIGKILL)


# ---- tokens ----------------------------------------------------------------------------------------------
def test_concurrent_streams_from_several_clients_match_in_process(server, model):
    prompts = random_prompts(1000, [5, 41, 17, 63, 9, 28, 52, 3, 36, 12, 47, 21, 8, 58, 30, 14], seed=8)
    params = [SamplingParams(max_tokens=12 + 3 * (i % 5), temperature=0, ignore_eos=True) for i in range(16)]
    expected = [o.token_ids for o in LLM(model, **ENGINE_FLAGS).generate(prompts, params)]
    before = server.stats()

    got: dict[int, list[int]] = {}
    failures: list[BaseException] = []

    def one_client(indices: list[int]) -> None:
        try:
            with Client(server.address, timeout_s=60) as client:
                streams = {i: client.generate(prompts[i], max_tokens=params[i].max_tokens, temperature=0,
                                              ignore_eos=True, priority=i % 3) for i in indices}
                tokens = {i: [] for i in indices}
                active = dict(streams)
                while active:  # interleave the streams of one client, a token event at a time
                    for i, stream in list(active.items()):
                        event = next(stream, None)
                        if event is None:
                            del active[i]
                        else:
                            tokens[i] += event.token_ids
                got.update(tokens)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test thread
            failures.append(e)

    threads = [threading.Thread(target=one_client, args=(list(range(c, 16, 4)),)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    assert [got[i] for i in range(16)] == expected
    # copies still in flight when the last token went out land within a few steps; then every block is free
    wait_until(lambda: server.stats()["num_swaps_in_flight"] == 0, 10, "in-flight swaps to land")
    after = server.stats()
    assert after["num_finished_requests"] - before["num_finished_requests"] == 16
    assert after["num_free_gpu_blocks"] == after["num_gpu_blocks"]
    assert after["num_swap_outs"] > before["num_swap_outs"], "the workload was meant to preempt and swap"


def test_text_stream_and_completion_agree(server):
    with Client(server.address) as client:
        streamed = list(client.generate("Tell me about block groups.", max_tokens=20, temperature=0))
        done = client.complete("Tell me about block groups.", max_tokens=20, temperature=0)
    assert streamed[-1].finished and streamed[-1].finish_reason == done.finish_reason
    assert [t for e in streamed for t in e.token_ids] == done.token_ids
    assert "".join(e.text for e in streamed) == done.text


def test_logprobs_stream_through_the_sdk_as_the_offline_api_gives_them(server, model):
    prompt = random_prompts(1000, [21], seed=4)[0]
    offline = LLM(model, **ENGINE_FLAGS).generate([prompt], SamplingParams(max_tokens=10, temperature=0,
                                                                            logprobs=2))[0]
    with Client(server.address) as client:
        events = list(client.generate(prompt, max_tokens=10, temperature=0, logprobs=2))
        done = client.complete(prompt, max_tokens=10, temperature=0, logprobs=2)
        plain = client.complete(prompt, max_tokens=3, temperature=0)
        with pytest.raises(ValueError, match="logprobs"):
            client.complete(prompt, logprobs=99)  # refused before anything is sent
    streamed = [entry for e in events for entry in e.logprobs]
    assert [t for e in events for t in e.token_ids] == done.token_ids == offline.token_ids
    for got in (streamed, done.logprobs):
        assert [list(entry) for entry in got] == [list(entry) for entry in offline.logprobs]
        for entry, expected in zip(got, offline.logprobs):
            assert list(entry.values()) == pytest.approx(list(expected.values()), abs=1e-5)
    assert plain.logprobs is None


def test_penalties_travel_through_the_sdk(server, model):
    prompt = random_prompts(1000, [15], seed=5)[0]
    penalties = {"presence_penalty": 0.4, "frequency_penalty": 1.0, "repetition_penalty": 1.4}
    offline = LLM(model, **ENGINE_FLAGS).generate([prompt], SamplingParams(max_tokens=10, temperature=0, **penalties))
    with Client(server.address) as client:
        assert client.complete(prompt, max_tokens=10, temperature=0, **penalties).token_ids == offline[0].token_ids
        with pytest.raises(ValueError, match="frequency_penalty"):
            client.complete(prompt, frequency_penalty=5)


# ---- bad input -------------------------------------------------------------------------------------------
def raw_request(address: str, payload: bytes, timeout_s: float = 10) -> object:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        sock.send(payload)
        assert sock.poll(int(timeout_s * 1000)), "the frontend did not answer"
        return decode(sock.recv())
    finally:
        sock.close()


def test_garbage_and_bad_parameters_get_error_replies_and_the_engine_keeps_serving(server):
    for payload in (b"\x00garbage\xff", encode(StatsRequest("s"))[:-3], b""):
        reply = raw_request(server.address, payload)
        assert isinstance(reply, ErrorReply) and not reply.fatal, reply
        assert "malformed" in reply.message
    bad = GenerateRequest("bad", None, prompt_token_ids=[1, 2, 3], params={"max_tokens": 0})
    reply = raw_request(server.address, encode(bad))
    assert isinstance(reply, ErrorReply) and "max_tokens" in reply.message
    unknown = GenerateRequest("bad2", None, prompt_token_ids=[1, 2, 3], params={"max_tokens": 4, "tempurature": 1.0})
    reply = raw_request(server.address, encode(unknown))
    assert isinstance(reply, ErrorReply) and "tempurature" in reply.message
    assert isinstance(raw_request(server.address, encode(StatsReply("x", {}))), ErrorReply)  # not a client message
    with Client(server.address) as client:
        with pytest.raises(RemoteError, match="shorten the prompt"):
            client.complete(list(range(3, 100)) * 100, max_tokens=4)
        with pytest.raises(RemoteError, match="unknown request id"):
            client.abort("never-sent")
        result = client.complete([5, 6, 7], max_tokens=6, temperature=0, ignore_eos=True)
    assert len(result.token_ids) == 6 and result.finish_reason == "length"
    assert server.proc.poll() is None


def test_a_client_that_disconnects_mid_stream_has_its_requests_aborted(server):
    aborted_before = server.stats()["num_aborted_requests"]
    client = Client(server.address)
    # together they need ~3x the 48 blocks: they run by turns, for far longer than a disconnect takes to notice
    streams = [client.generate(p, max_tokens=150, temperature=0, ignore_eos=True)
               for p in random_prompts(1000, [10, 20, 30], seed=3)]
    next(streams[0])  # running
    client.close()  # gone without aborting anything

    def drained() -> bool:
        stats = server.stats()
        return stats["num_free_gpu_blocks"] == stats["num_gpu_blocks"] and stats["num_running"] == 0

    wait_until(drained, 15, "the disconnected client's requests to be aborted")
    stats = server.stats()
    assert stats["num_waiting"] + stats["num_swapped"] + stats["num_swaps_in_flight"] == 0
    assert stats["num_aborted_requests"] - aborted_before == 3


# ---- lifecycle -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["worker", "swap"])
def test_killing_a_child_fails_every_pending_call_and_leaves_nothing_behind(model, tmp_path, victim):
    shm_before = run_dirs()
    launched = Launched(model, tmp_path / "stderr.log", num_gpu_blocks=1024)
    try:
        procs = launched.processes()
        children = procs["children"]
        target = procs["workers"][0] if victim == "worker" else procs["swap"]
        clients = [Client(launched.address, timeout_s=30) for _ in range(2)]
        streams = [c.generate(p, max_tokens=500, temperature=0, ignore_eos=True, priority=i % 3)
                   for i, (c, p) in enumerate(zip(clients * 3, random_prompts(1000, [10, 30, 50, 20, 40, 60], seed=6)))]
        for s in streams:
            next(s)  # every request is admitted and streaming
        os.kill(target, signal.SIGKILL)
        start = time.monotonic()
        for s in streams:
            with pytest.raises(EngineDeadError, match="died|failed|gone"):
                for _ in s:
                    pass
        assert time.monotonic() - start < 10, "pending calls took too long to fail"
        code = launched.proc.wait(15)
        assert code != 0
        wait_until(lambda: not any(alive(pid) for pid in children), 10, "every child process to exit")
        assert run_dirs() <= shm_before, "the engine left its run directory in /dev/shm"
        for c in clients:
            c.close()
    finally:
        launched.stop(signal.SIGKILL)


def test_sigterm_shuts_down_cleanly_and_a_killed_frontend_leaves_no_orphans(model, tmp_path):
    launched = Launched(model, tmp_path / "a.log", num_gpu_blocks=1024)
    children, run_dir = launched.processes()["children"], launched.run_dir  # this engine's own, whatever else runs
    with Client(launched.address) as client:
        stream = client.generate([4, 5, 6], max_tokens=500, temperature=0, ignore_eos=True)
        next(stream)
        assert launched.stop(signal.SIGTERM) == 0
        with pytest.raises((EngineDeadError, RemoteError)):  # the pending call is told, not left hanging
            for _ in stream:
                pass
    assert not any(alive(pid) for pid in children)
    assert not run_dir.exists()

    launched = Launched(model, tmp_path / "b.log")  # SIGKILL: no chance to clean up, the children must
    children, run_dir = launched.processes()["children"], launched.run_dir
    launched.stop(signal.SIGKILL)
    wait_until(lambda: not any(alive(pid) for pid in children), 10, "orphaned children to exit")
    wait_until(lambda: not run_dir.exists(), 5, "the orphaned run directory to be removed")


def test_ctrl_c_stops_the_whole_process_group_cleanly_without_a_traceback(model, tmp_path):
    """A terminal's Ctrl-C sends SIGINT to every process of the job: the children leave the stop to the
    frontend, which shuts the engine down in order."""
    launched = Launched(model, tmp_path / "a.log", new_session=True, num_gpu_blocks=1024)
    children, run_dir = launched.processes()["children"], launched.run_dir
    with Client(launched.address) as client:
        stream = client.generate([4, 5, 6], max_tokens=500, temperature=0, ignore_eos=True)
        next(stream)
        os.killpg(launched.proc.pid, signal.SIGINT)
        assert launched.proc.wait(30) == 0
        with pytest.raises((EngineDeadError, RemoteError)):
            for _ in stream:
                pass
    assert "Traceback" not in launched.log.read_text(), launched.log.read_text()[-2000:]
    assert not any(alive(pid) for pid in children)
    assert not run_dir.exists()


def test_a_launch_on_a_taken_port_says_so_in_one_line_and_leaves_nothing(model, tmp_path):
    import socket
    import subprocess
    import sys

    from tests.launcher import ROOT

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        before = run_dirs()
        proc = subprocess.run([sys.executable, "-m", "fs_engine", "launch", "--model", str(model), "--port",
                               str(port)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"cannot listen on tcp://127.0.0.1:{port}" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert run_dirs() <= before


def test_a_run_directory_whose_owner_is_gone_is_reaped_by_the_next_engine(tmp_path):
    import subprocess
    import sys

    from ipc.channels import OWNER_FILE, RUN_DIR_PREFIX, reap_run_dirs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{RUN_DIR_PREFIX}stale"
    stale.mkdir()
    (stale / OWNER_FILE).write_text(dead.stdout.strip())
    (stale / "kv-rank0.bin").write_bytes(b"\0" * 1024)
    live = tmp_path / f"{RUN_DIR_PREFIX}live"
    live.mkdir()
    (live / OWNER_FILE).write_text(str(os.getpid()))
    unknown = tmp_path / f"{RUN_DIR_PREFIX}unknown"  # no owner file: nothing says it is stale
    unknown.mkdir()
    assert reap_run_dirs(tmp_path) == [stale]
    assert not stale.exists() and live.exists() and unknown.exists()


def test_an_idle_server_notices_a_dead_child_and_exits_non_zero(model, tmp_path):
    launched = Launched(model, tmp_path / "stderr.log")
    try:
        procs = launched.processes()
        os.kill(procs["swap"], signal.SIGKILL)  # no request in flight: nothing waits on the swap process
        assert launched.proc.wait(10) != 0
        assert "swap" in launched.log.read_text()
        wait_until(lambda: not any(alive(pid) for pid in procs["children"]), 10, "every child process to exit")
    finally:
        launched.stop(signal.SIGKILL)


def test_a_stopped_worker_is_waited_for_and_its_clients_keep_hearing_from_the_server(model, tmp_path):
    """A worker that stops (SIGSTOP, a long GC pause, a stalled device) is not dead: the server keeps sending
    keep-alives while it waits, so a client with a short timeout is not fooled, and the stream resumes."""
    prompt = [7, 8, 9, 10]
    params = SamplingParams(max_tokens=1000, temperature=0, ignore_eos=True)  # still running when the worker stops
    expected = LLM(model, **{**ENGINE_FLAGS, "num_gpu_blocks": 1024}).generate([prompt], params)[0].token_ids
    launched = Launched(model, tmp_path / "stderr.log", num_gpu_blocks=1024)
    try:
        worker = launched.processes()["workers"][0]
        with Client(launched.address, timeout_s=3) as client:
            stream = client.generate(prompt, max_tokens=1000, temperature=0, ignore_eos=True)
            tokens = next(stream).token_ids
            os.kill(worker, signal.SIGSTOP)
            resume = threading.Timer(7, os.kill, (worker, signal.SIGCONT))  # over twice the client's timeout
            resume.start()  # ... while this thread waits on the stream
            try:
                tokens += [t for event in stream for t in event.token_ids]
            finally:
                resume.join()
                os.kill(worker, signal.SIGCONT)
        assert tokens == expected
    finally:
        launched.stop(signal.SIGKILL)
