"""What one client of ``fs-engine launch`` may cost everyone else (no heavy imports: the CLI's defaults)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ClientLimits:
    """What one client may cost everyone else (``fs-engine launch --max-...``); over a limit, an immediate error
    that names it."""

    max_requests: int = 1024  # requests in flight at once
    max_prompt_tokens: int = 1 << 20  # prompt tokens of those requests together
    max_prompt_bytes: int = 1 << 20  # one text prompt (tokenized on the engine loop)
    max_queued_messages: int = 10_000  # messages it has not read; past this its requests are aborted
