"""The decoder against random, truncated, nested, mutated and wrongly typed frames: it returns a message or
raises ProtocolError, never anything else (no crash, no other exception, no unbounded recursion)."""

from __future__ import annotations

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc.codec import decode, encode
from ipc.errors import ProtocolError
from ipc.messages import PROTOCOL_VERSION, AbortRequest, GenerateRequest, StatsRequest, UpdatePriority

VALID = [encode(GenerateRequest("r", "hello", params={"max_tokens": 3, "stop": ["x"]}, session_id="s")),
         encode(GenerateRequest("r", None, prompt_token_ids=[1, 2, 3])),
         encode(AbortRequest("r")), encode(UpdatePriority("r", 2)), encode(StatsRequest("s"))]
NAMES = ["GenerateRequest", "AbortRequest", "UpdatePriority", "StatsRequest", "StepPlan", "Nope"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=True),
                    st.text(max_size=20), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=5),
                                                       st.dictionaries(st.text(max_size=5), inner, max_size=5)),
                      max_leaves=20)


def frame_of(name: str, fields: list, depth: int) -> bytes:
    body = msgpack.packb([name, fields])
    for _ in range(depth):
        body = msgpack.packb([name, [msgpack.ExtType(1, body)] + fields[1:]])
    return msgpack.packb([PROTOCOL_VERSION, msgpack.ExtType(1, body)])


def survives(frame: bytes) -> None:
    try:
        decode(frame, checked=True)
    except ProtocolError:
        pass


FUZZ = settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes(frame):
    survives(frame)


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_truncated_and_mutated_valid_frames(frame, data):
    cut = data.draw(st.integers(0, len(frame)))
    survives(frame[:cut])
    if frame:
        i = data.draw(st.integers(0, len(frame) - 1))
        survives(frame[:i] + bytes([data.draw(st.integers(0, 255))]) + frame[i + 1:])


@FUZZ
@given(st.sampled_from(NAMES), st.lists(values, max_size=9), st.integers(0, 40))
def test_wrongly_typed_and_nested_messages(name, fields, depth):
    survives(frame_of(name, fields, depth))
