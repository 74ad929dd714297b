"""Shared fixtures: tiny real-architecture checkpoints, built once per test session, and the HF reference."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# Without CUDA the Triton kernels run only in Triton's interpreter, and triton reads this when it is first
# imported (transformers imports it while tests are collected): set it before anything can
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ("llama", "qwen2", "qwen3")


def _parse_value(text: str) -> object:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# FS_TEST_ENGINE_ARGS="device=cuda,dtype=float32,compile=off,kv_cache_memory_gb=2": defaults for every engine a
# test builds in this process (what a test passes itself still wins). tools/gpu_checks.sh runs the CPU suite's
# integration tests on CUDA this way, in float32 so that the transformers oracle still applies.
TEST_ENGINE_ARGS = {key: _parse_value(value) for key, value in
                    (item.split("=", 1) for item in os.environ.get("FS_TEST_ENGINE_ARGS", "").split(",") if item)}
if TEST_ENGINE_ARGS:
    from fs_engine.config import EngineConfig

    _from_kwargs = EngineConfig.from_kwargs.__func__

    def _with_test_defaults(cls, **kwargs):
        return _from_kwargs(cls, **{**TEST_ENGINE_ARGS, **kwargs})

    EngineConfig.from_kwargs = classmethod(_with_test_defaults)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    # the embedded default model is generated into a per-session cache, never the user's home
    os.environ.setdefault("FS_ENGINE_CACHE", str(tmp_path_factory.mktemp("fs_engine_cache")))


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from fs_engine.tiny_model import make_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: make_tiny_model(arch, root / arch, seed=0) for arch in ARCHS}


@pytest.fixture(scope="session", params=ARCHS)
def tiny_model(request: pytest.FixtureRequest, tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs[request.param]


def random_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


class HFReference:
    """Greedy generation with transformers in float32 on CPU: the correctness oracle."""

    def __init__(self, model_dir: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        self.gen_config = GenerationConfig.from_pretrained(str(model_dir))

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
        torch = self.torch
        ids = torch.tensor([prompt_ids])
        eos = self.gen_config.eos_token_id if stop_at_eos else None
        with torch.no_grad():
            out = self.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=0,
            )
        return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="session")
def hf_reference():
    cache: dict[Path, HFReference] = {}

    def get(model_dir: Path) -> HFReference:
        if model_dir not in cache:
            cache[model_dir] = HFReference(model_dir)
        return cache[model_dir]

    return get
