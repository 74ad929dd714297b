"""msgpack encoding of the registered message types.

Every message is a dataclass registered here under a stable name; nothing is guessed by reflection at
decode time. A type whose constructor is not its field list (``StepPlan``) builds itself from the field
values with a ``_from_wire(*values)`` classmethod. A frame is ``msgpack([PROTOCOL_VERSION, name, [field values in declaration order]])``;
nested messages become msgpack ext values of the same shape, and fields declared with
``metadata={"wire": "int32"}`` (token-id lists) travel as raw little-endian int32 bytes, not lists.

Decoding rejects, with a ``ProtocolError`` that says what is wrong: another protocol version, an unknown
message name, a wrong number of fields, and bytes that are not msgpack at all.
"""

from __future__ import annotations

import dataclasses
import sys
from array import array
from typing import Any

import msgpack

from ipc.errors import ProtocolError
from ipc.messages import MESSAGE_TYPES, PROTOCOL_VERSION

_EXT_MESSAGE = 1
_EXT_INT32 = 2
_LITTLE = sys.byteorder == "little"

_REGISTRY: dict[str, type] = {}
_NAMES: dict[type, str] = {}
_INT32_FIELDS: dict[type, frozenset[str]] = {}


def register(cls: type) -> type:
    """Make a message dataclass encodable; its class name is its wire name (so it must stay stable)."""
    assert dataclasses.is_dataclass(cls), f"{cls} is not a dataclass"
    name = cls.__name__
    assert name not in _REGISTRY or _REGISTRY[name] is cls, f"two message types named {name}"
    _REGISTRY[name] = cls
    _NAMES[cls] = name
    _INT32_FIELDS[cls] = frozenset(f.name for f in dataclasses.fields(cls) if f.metadata.get("wire") == "int32")
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
        name, values = msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
        return _build(name, values)
    raise ProtocolError(f"unknown msgpack extension {code}")


def _build(name: str, values: list[Any]) -> Any:
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ProtocolError(f"unknown message type {name!r}")
    fields = dataclasses.fields(cls)
    if not isinstance(values, list) or len(values) != len(fields):
        raise ProtocolError(f"{name} needs {len(fields)} fields, got {values!r:.200}")
    try:
        return cls._from_wire(*values) if hasattr(cls, "_from_wire") else cls(*values)
    except (TypeError, ValueError) as e:
        raise ProtocolError(f"bad {name}: {e}") from e


def encode(msg: Any) -> bytes:
    if type(msg) not in _NAMES:
        raise TypeError(f"cannot encode {type(msg).__name__}: register it in ipc.messages")
    return msgpack.packb([PROTOCOL_VERSION, msgpack.ExtType(_EXT_MESSAGE, _pack_body(msg))], use_bin_type=True)


def decode(frame: bytes) -> Any:
    try:
        top = msgpack.unpackb(frame, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - any malformed input becomes one clear error
        raise ProtocolError(f"not a valid fs-engine message ({type(e).__name__}: {e})") from e
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
