"""msgpack encoding of the registered message types.

Every message is a dataclass registered here under a stable name; nothing is guessed by reflection at
decode time. A type whose constructor is not its field list (``StepPlan``) builds itself from the field
values with a ``_from_wire(*values)`` classmethod. A frame is ``msgpack([PROTOCOL_VERSION, name, [field values in declaration order]])``;
nested messages become msgpack ext values of the same shape, and fields declared with
``metadata={"wire": "int32"}`` (token-id lists) travel as raw little-endian int32 bytes, not lists.

Decoding rejects, with a ``ProtocolError`` that says what is wrong: another protocol version, an unknown
message name, a wrong number of fields, bytes that are not msgpack at all, messages nested deeper than any
real one (``MAX_DEPTH``: the ext hook recurses, so a hostile frame could otherwise exhaust the C stack) and
frames over ``max_bytes``. ``decode(frame, checked=True)`` (every frame from a client) also checks each field
against its declared type: ints are ints (not bools) within int64, floats finite, strings strings, lists of
what they hold, nested messages of their type, ``X | None`` either.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import threading
import types
import typing
from array import array
from typing import Any

import msgpack

from ipc.errors import ProtocolError
from ipc.messages import MESSAGE_TYPES, PROTOCOL_VERSION

_EXT_MESSAGE = 1
_EXT_INT32 = 2
_LITTLE = sys.byteorder == "little"
MAX_DEPTH = 8  # the deepest real message is 3 (StepPlan > NewRequest > SamplingSpec)
MAX_FRAME_BYTES = 256 << 20  # the largest frame decode accepts by default (internal plans are kilobytes)
_INT64 = (-(1 << 63), 1 << 63)

_REGISTRY: dict[str, type] = {}
_NAMES: dict[type, str] = {}
_INT32_FIELDS: dict[type, frozenset[str]] = {}
_CHECKS: dict[type, list] = {}  # per field, in order: (name, check(value) -> bool, what it must be)
_state = threading.local()  # the ext hook's nesting depth and whether fields are checked, per decoding thread


def _check_for(tp: Any) -> tuple[Any, str]:
    """(check(value) -> bool, description) of a declared field type."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return (lambda v: True), "anything"
    if tp is type(None):
        return (lambda v: v is None), "None"
    if tp is bool:
        return (lambda v: isinstance(v, bool)), "true or false"
    if tp is int:
        return (lambda v: type(v) is int and _INT64[0] <= v < _INT64[1]), "a 64-bit integer"
    if tp is float:
        return (lambda v: type(v) in (int, float) and math.isfinite(v)), "a finite number"
    if tp is str:
        return (lambda v: isinstance(v, str)), "a string"
    if tp is dict or origin is dict:
        return (lambda v: isinstance(v, dict)), "a map"
    if origin in (typing.Union, types.UnionType):
        parts = [_check_for(a) for a in typing.get_args(tp)]
        return (lambda v: any(check(v) for check, _ in parts)), " or ".join(what for _, what in parts)
    if origin is list or origin is tuple:
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed-length tuple: travels as a list
            items = [_check_for(a) for a in args]
            return (lambda v: isinstance(v, (list, tuple)) and len(v) == len(items)
                    and all(check(x) for (check, _), x in zip(items, v))), f"a list of {len(items)} values"
        item, what = _check_for(args[0]) if args else ((lambda v: True), "values")
        return (lambda v: isinstance(v, (list, tuple)) and all(item(x) for x in v)), f"a list of {what}"
    if isinstance(tp, type):
        return (lambda v: isinstance(v, tp)), f"a {tp.__name__}"
    raise TypeError(f"message field type {tp!r} has no check")


def register(cls: type) -> type:
    """Make a message dataclass encodable; its class name is its wire name (so it must stay stable)."""
    assert dataclasses.is_dataclass(cls), f"{cls} is not a dataclass"
    name = cls.__name__
    assert name not in _REGISTRY or _REGISTRY[name] is cls, f"two message types named {name}"
    _REGISTRY[name] = cls
    _NAMES[cls] = name
    _INT32_FIELDS[cls] = frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("wire") == "int32")
    hints = typing.get_type_hints(cls)
    _CHECKS[cls] = [(f.name, *_check_for(hints[f.name])) for f in dataclasses.fields(cls)]
    return cls


def _int32_bytes(values: Any) -> bytes:
    arr = array("i", values)
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def _int32_list(data: bytes) -> list[int]:
    arr = array("i")
    arr.frombytes(data)
    if not _LITTLE:
        arr.byteswap()
    return arr.tolist()


def _default(obj: Any) -> Any:
    cls = type(obj)
    if cls in _NAMES:
        return msgpack.ExtType(_EXT_MESSAGE, _pack_body(obj))
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"cannot encode {cls.__name__}: register it in ipc.messages")


def _pack_body(msg: Any) -> bytes:
    cls = type(msg)
    int32 = _INT32_FIELDS[cls]
    values = []
    for f in dataclasses.fields(cls):
        value = getattr(msg, f.name)
        values.append(msgpack.ExtType(_EXT_INT32, _int32_bytes(value)) if f.name in int32 and value is not None
                      else value)
    return msgpack.packb([_NAMES[cls], values], default=_default, use_bin_type=True)


def _ext_hook(code: int, data: bytes) -> Any:
    if code == _EXT_INT32:
        return _int32_list(data)
    if code == _EXT_MESSAGE:
        depth = getattr(_state, "depth", 0)
        if depth >= MAX_DEPTH:
            raise ProtocolError(f"messages nested deeper than {MAX_DEPTH}")
        _state.depth = depth + 1
        try:
            body = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
        finally:
            _state.depth = depth
        if not isinstance(body, list) or len(body) != 2 or not isinstance(body[0], str):
            raise ProtocolError("not a valid fs-engine message (expected [name, fields])")
        return _build(*body)
    raise ProtocolError(f"unknown msgpack extension {code}")


def _build(name: str, values: list[Any]) -> Any:
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ProtocolError(f"unknown message type {name!r}")
    fields = dataclasses.fields(cls)
    if not isinstance(values, list) or len(values) != len(fields):
        raise ProtocolError(f"{name} needs {len(fields)} fields, got {values!r:.200}")
    if getattr(_state, "checked", False):
        for (field_name, check, what), value in zip(_CHECKS[cls], values):
            if not check(value):
                raise ProtocolError(f"{name}.{field_name} must be {what}, got {value!r:.80}")
    try:
        return cls._from_wire(*values) if hasattr(cls, "_from_wire") else cls(*values)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"bad {name}: {e}") from e


def encode(msg: Any) -> bytes:
    if type(msg) not in _NAMES:
        raise TypeError(f"cannot encode {type(msg).__name__}: register it in ipc.messages")
    return msgpack.packb([PROTOCOL_VERSION, msgpack.ExtType(_EXT_MESSAGE, _pack_body(msg))], use_bin_type=True)


def decode(frame: bytes, *, checked: bool = False, max_bytes: int = MAX_FRAME_BYTES) -> Any:
    """A message from a frame; ``checked``: also check every field's type (frames from clients)."""
    if len(frame) > max_bytes:
        raise ProtocolError(f"a frame of {len(frame)} bytes is over the limit of {max_bytes}")
    _state.depth, _state.checked = 0, checked
    try:
        top = msgpack.unpackb(frame, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except RecursionError as e:
        raise ProtocolError("not a valid fs-engine message (nested too deeply)") from e
    except Exception as e:  # noqa: BLE001 - any malformed input becomes one clear error
        raise ProtocolError(f"not a valid fs-engine message ({type(e).__name__}: {e})") from e
    finally:
        _state.checked = False
    if not isinstance(top, list) or len(top) != 2:
        raise ProtocolError("not a valid fs-engine message (expected [version, message])")
    version, msg = top
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not supported; this side speaks {PROTOCOL_VERSION}")
    if type(msg) not in _NAMES:
        raise ProtocolError("not a valid fs-engine message (no message body)")
    return msg


for _cls in MESSAGE_TYPES:
    register(_cls)
