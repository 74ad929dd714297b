"""The OpenAI-compatible HTTP API (``fs-engine serve``): its own process, in front of the engine."""
