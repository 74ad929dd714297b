"""The wire format: every message round-trips exactly, token ids travel as int32 bytes, bad bytes are refused."""

from __future__ import annotations

import os
import shutil

import msgpack
import pytest
import zmq

from ipc.channels import Dealer, PeerGone, Puller, Pusher, Router, instance_dir, ipc_address
from ipc.codec import decode, encode
from ipc.errors import ProtocolError
from ipc.messages import (
    PROTOCOL_VERSION,
    NewRequest,
    SamplingSpec,
    ScheduledChunk,
    StepPlan,
    StepResult,
    SwapCommand,
    SwapDone,
)

PLAN = StepPlan(
    step_id=7,
    chunks=[ScheduledChunk("r1", list(range(300)), 16, [4, 5, 9], True, 3),
            ScheduledChunk("r2", [2**31 - 1, -(2**31)], 0, [0], False, 0)],
    new_requests=[NewRequest("r1", SamplingSpec(0.7, 0.9, 40, 1234)), NewRequest("r2", SamplingSpec())],
    finished_ids=["old"],
    swaps=[SwapCommand(1, "out", [[3, 10, 4]], True), SwapCommand(2, "in", [[0, 8, 1], [5, 2, 2]], False)],
)
RESULT = StepResult(7, ["r1"], [99], 0.012, [SwapDone(1, 1, 4096, 0.001)], 0.0005)


@pytest.mark.parametrize("msg", [PLAN, RESULT, SamplingSpec(0.0), SwapDone(3, 0, 0, 0.0)])
def test_messages_round_trip_exactly(msg):
    assert decode(encode(msg)) == msg


def test_token_ids_travel_as_raw_int32_bytes():
    frame = encode(StepPlan(1, [ScheduledChunk("r", list(range(1000)), 0, [], True)]))
    assert len(frame) < 4000 + 200  # 4 bytes a token, whatever its value
    assert decode(frame).chunks[0].token_ids == list(range(1000))


@pytest.mark.parametrize("frame, match", [
    (b"\xc1garbage", "not a valid"),
    (msgpack.packb([PROTOCOL_VERSION + 1, 0]), "protocol version"),
    (msgpack.packb({"a": 1}), "not a valid"),
    (msgpack.packb([PROTOCOL_VERSION, msgpack.ExtType(1, msgpack.packb(["NoSuchMessage", []]))]), "unknown message"),
    (msgpack.packb([PROTOCOL_VERSION, msgpack.ExtType(1, msgpack.packb(["SwapDone", [1, 2]]))]), "needs 5 fields"),
    (encode(PLAN)[:-5], "not a valid"),
])
def test_bad_frames_raise_protocol_errors(frame, match):
    with pytest.raises(ProtocolError, match=match):
        decode(frame)


def test_unregistered_objects_cannot_be_sent():
    with pytest.raises(TypeError, match="register"):
        encode(object())


def test_channels_carry_messages_and_report_gone_clients():
    ctx = zmq.Context()
    run_dir = instance_dir()
    try:
        puller = Puller(ctx, ipc_address(run_dir, "results"))
        pusher = Pusher(ctx, puller.address)
        pusher.send(RESULT)
        assert puller.recv(timeout_s=2) == RESULT
        assert puller.recv(timeout_s=0.05) is None  # a timeout, not a hang

        router = Router(ctx, "tcp://127.0.0.1:0")
        dealer = Dealer(ctx, router.address)
        dealer.send(PLAN)
        identity, msg = router.recv(timeout_s=2)
        assert msg == PLAN
        dealer.socket.send(b"\xc1 not msgpack")
        _, bad = router.recv(timeout_s=2)
        assert isinstance(bad, ProtocolError)
        router.send(identity, RESULT)
        assert dealer.recv(timeout_s=2) == RESULT
        with pytest.raises(PeerGone):
            router.send(b"no-such-client", RESULT)
        for channel in (puller, pusher, router, dealer):
            channel.close()
    finally:
        ctx.term()
        for path in run_dir.iterdir():
            path.unlink()
        run_dir.rmdir()
    first, second = instance_dir(), instance_dir()  # every engine gets its own endpoints
    assert first != second
    assert (first / "owner.pid").read_text() == str(os.getpid())  # named, so it can be reaped
    for path in (first, second):
        shutil.rmtree(path)


# ---- untrusted frames ------------------------------------------------------------------------------------
def _nested(depth: int) -> bytes:
    body = msgpack.packb(["StatsRequest", ["x"]])
    for _ in range(depth):
        body = msgpack.packb(["StatsRequest", [msgpack.ExtType(1, body)]])
    return msgpack.packb([PROTOCOL_VERSION, msgpack.ExtType(1, body)])


def test_nesting_deeper_than_any_real_message_is_refused_not_recursed_into():
    from ipc.codec import MAX_DEPTH

    decode(encode(PLAN))  # the deepest real message (3 levels) is fine
    for depth in (MAX_DEPTH, 10_000):
        with pytest.raises(ProtocolError, match="nested"):
            decode(_nested(depth))


def test_a_frame_over_the_limit_is_refused_before_it_is_parsed():
    frame = encode(PLAN)
    with pytest.raises(ProtocolError, match="over the limit"):
        decode(frame, max_bytes=len(frame) - 1)


@pytest.mark.parametrize("fields,says", [
    ({"request_id": 5}, "GenerateRequest.request_id must be a string"),
    ({"priority": 1.5}, "GenerateRequest.priority must be a 64-bit integer"),
    ({"priority": True}, "GenerateRequest.priority must be a 64-bit integer"),
    ({"session_id": [1]}, "GenerateRequest.session_id must be a string or None"),
    ({"stream": 1}, "GenerateRequest.stream must be true or false"),
    ({"params": [1, 2]}, "GenerateRequest.params must be a map"),
])
def test_checked_decoding_refuses_a_field_of_the_wrong_type(fields, says):
    from ipc.messages import GenerateRequest

    values = {"request_id": "r", "prompt": "hi", "prompt_token_ids": None, "params": {}, "priority": 0,
              "tenant": "default", "session_id": None, "stream": True, **fields}
    body = msgpack.packb(["GenerateRequest", list(values.values())])
    frame = msgpack.packb([PROTOCOL_VERSION, msgpack.ExtType(1, body)])
    assert isinstance(decode(frame), GenerateRequest)  # unchecked (internal sockets): built as sent
    with pytest.raises(ProtocolError, match=says):
        decode(frame, checked=True)
    assert decode(encode(PLAN), checked=True) == decode(encode(PLAN))  # every real message passes its checks
