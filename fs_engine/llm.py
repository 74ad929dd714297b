"""Offline batch API: ``LLM(model).generate(prompts, params)`` with continuous batching underneath."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fs_engine.engine.llm_engine import LLMEngine, Prompt
from fs_engine.request import RequestOutput
from fs_engine.sampling_params import SamplingParams


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(t, int) for t in prompts):
        return [prompts]  # one prompt given as token ids
    return prompts


class LLM:
    """Runs an ``LLMEngine`` in this process (with ``tensor_parallel_size`` above 1, its workers in one
    process per rank). ``model=None`` uses the embedded tiny default model."""

    def __init__(self, model: str | Path | None = None, **engine_args: Any) -> None:
        multiprocess = engine_args.get("tensor_parallel_size", 1) != 1
        self.engine = LLMEngine(model, multiprocess=multiprocess, **engine_args)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priorities: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order."""
        prompt_list = _as_prompt_list(prompts)
        if not prompt_list:
            return []
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(prompt_list)
        else:
            param_list = list(params)
        if len(param_list) != len(prompt_list):
            raise ValueError(f"got {len(param_list)} SamplingParams for {len(prompt_list)} prompts; give one or one each")
        priority_list = list(priorities) if priorities is not None else [0] * len(prompt_list)
        if len(priority_list) != len(prompt_list):
            raise ValueError(f"got {len(priority_list)} priorities for {len(prompt_list)} prompts")

        ids = [f"llm-{next(self._ids)}" for _ in prompt_list]
        added: list[str] = []
        try:
            for request_id, prompt, p, prio in zip(ids, prompt_list, param_list, priority_list):
                self.engine.add_request(request_id, prompt, p, priority=prio)
                added.append(request_id)
        except Exception:
            for request_id in added:  # a bad prompt in the batch: nothing else stays queued
                self.engine.abort(request_id)
            raise
        return self._run(ids)

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        try:
            # after the last output, keep stepping until write-backs to the CPU store have landed
            for outputs in self.engine.run():
                for out in outputs:
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
        except BaseException:
            for request_id in wanted - done.keys():  # interrupted: free what this call queued
                if request_id in self.engine.scheduler.requests:
                    self.engine.abort(request_id)
            raise
        return [done[i] for i in ids]

    def stats(self) -> dict[str, int | float]:
        return self.engine.stats()
