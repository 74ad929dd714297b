"""What one client, and one tenant, of ``fs-engine launch`` may cost everyone else (no heavy imports: the CLI's
defaults). Over a limit a request gets an immediate error that names the limit; nobody else waits for it."""

from __future__ import annotations

import dataclasses


HELP = {
    "max_requests_per_client": "requests one client may have in flight",
    "max_prompt_tokens_per_client": "prompt tokens of one client's requests in flight together",
    "max_requests_per_tenant": "requests all clients of one tenant may have in flight together",
    "max_prompt_tokens_per_tenant": "prompt tokens of one tenant's requests in flight together",
    "max_prompt_bytes": "largest text prompt, in UTF-8 bytes",
    "max_stop_strings": "stop strings one request may give",
    "max_stop_length": "characters of one stop string",
    "max_queued_messages": "messages a client may leave unread before its requests are aborted",
}


@dataclasses.dataclass(frozen=True)
class ClientLimits:
    """Each field is a ``fs-engine launch`` flag of the same name (``--max-requests-per-client``, ...)."""

    max_requests_per_client: int = 1024  # requests in flight at once
    max_prompt_tokens_per_client: int = 1 << 20  # prompt tokens of those requests together
    max_requests_per_tenant: int = 4096  # ... of all of one tenant's clients together
    max_prompt_tokens_per_tenant: int = 4 << 20
    max_prompt_bytes: int = 1 << 20  # one text prompt
    max_stop_strings: int = 16  # each is matched against the request's new text every step
    max_stop_length: int = 256  # characters of one stop string
    max_queued_messages: int = 10_000  # messages a client has not read; past this its requests are aborted

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or value < 1:
                flag = "--" + f.name.replace("_", "-")
                raise ValueError(f"{flag} must be a positive integer, got {value!r}")
