"""Closed-loop multi-turn conversations over an ``LLMEngine`` (token ids; used by tests and benchmarks).

Conversation ``c``'s turn ``t`` prompt is its whole history, every earlier prompt and reply, followed by
``messages[c][t]``; turn ``t + 1`` is submitted ``think_steps`` engine steps after turn ``t`` finishes, the
way a user reads a reply before answering. Each conversation carries ``session_id=f"conv{c}"``, so the
CPU store can hand the next turn its history's KV instead of prefilling it again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from fs_engine.engine.llm_engine import LLMEngine
from fs_engine.request import RequestOutput
from fs_engine.sampling_params import SamplingParams


def run_conversations(
    engine: LLMEngine,
    messages: Sequence[Sequence[list[int]]],
    params: SamplingParams,
    *,
    think_steps: int = 2,
    on_step: Callable[[LLMEngine, int], None] | None = None,
    max_steps: int = 100_000,
) -> list[list[RequestOutput]]:
    """Run every conversation to its last turn; returns the outputs per conversation, per turn."""
    replies: list[list[RequestOutput]] = [[] for _ in messages]
    history = [list() for _ in messages]
    due: dict[int, int] = dict.fromkeys(range(len(messages)), 0)  # conversation -> step its next turn is sent

    def submit(c: int) -> None:
        turn = len(replies[c])
        history[c] += messages[c][turn]
        engine.add_request(f"conv{c}-turn{turn}", list(history[c]), params, session_id=f"conv{c}")

    step = 0
    while due or engine.has_unfinished_requests():
        for c in [c for c, at in due.items() if at <= step]:
            del due[c]
            submit(c)
        for out in engine.step():
            if not out.finished:
                continue
            c, turn = (int(x) for x in out.request_id.removeprefix("conv").split("-turn"))
            replies[c].append(out)
            history[c] += out.token_ids
            if turn + 1 < len(messages[c]):
                due[c] = step + 1 + think_steps
        step += 1
        if on_step is not None:
            on_step(engine, step)
        if step >= max_steps:
            raise RuntimeError(f"conversations did not finish within {max_steps} steps")
    return replies
