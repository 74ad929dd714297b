"""Errors that cross process boundaries."""


class ProtocolError(ValueError):
    """Bytes that are not a valid message of this protocol version."""


class EngineDeadError(RuntimeError):
    """A process of the engine (frontend, worker or swap process) died or stopped answering."""


class RemoteError(RuntimeError):
    """The other side rejected a request; the message says why and what to change."""
