"""``fs-engine launch --dry-run``: the per-rank memory plan of a real model's shapes, without any process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from fs_engine.cli import main
from fs_engine.config import EngineConfig
from fs_engine.engine.memory_plan import memory_plan, sharded_weight_bytes
from fs_engine.model_config import load_model_arch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
from make_shapes_config import write_config  # noqa: E402

QWEN25_32B_PARAMS = 32.76e9  # Qwen2.5-32B's parameter count (untied embedding and LM head)


@pytest.fixture(scope="module")
def qwen32b(tmp_path_factory) -> Path:
    return write_config("qwen2.5-32b", tmp_path_factory.mktemp("qwen32b"))


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_a_32b_model_is_planned_per_rank(qwen32b, tp, capsys):
    code = main(["launch", "--model", str(qwen32b), "--load-format", "dummy", "--tensor-parallel-size", str(tp),
                 "--max-model-len", "8192", "--dry-run", "h100"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"per rank of {tp} (h100" in out and "context switch   8192 tokens" in out
    arch = load_model_arch(qwen32b)
    config = EngineConfig.from_kwargs(model=str(qwen32b), tensor_parallel_size=tp)
    plan = memory_plan(config, arch, 8192, "h100")
    # bf16 weights: the whole model's over the ranks (norms and biases are a rounding error)
    assert plan.weight_bytes == pytest.approx(2 * QWEN25_32B_PARAMS / tp, rel=0.01)
    # 8 KV heads of 128 over 64 layers: 256 KiB per token in all, a 1/tp share per rank
    assert plan.kv_block_bytes == 16 * 64 * 2 * (8 // tp if tp <= 8 else 1) * 128 * 2
    assert plan.switch_bytes == 512 * plan.kv_block_bytes
    used = plan.weight_bytes + plan.activation_bytes + plan.overhead_bytes + plan.num_blocks * plan.kv_block_bytes
    assert used <= 0.9 * 80 * 2**30 and (plan.capped or used > 0.9 * 80 * 2**30 - plan.kv_block_bytes)


def test_more_ranks_split_the_switch_and_hold_more_tokens(qwen32b):
    arch = load_model_arch(qwen32b)
    plans = {tp: memory_plan(EngineConfig.from_kwargs(model=str(qwen32b), tensor_parallel_size=tp), arch, 8192, "h100")
             for tp in (1, 2, 4)}
    assert plans[1].kv_tokens < plans[2].kv_tokens < plans[4].kv_tokens
    assert plans[1].switch_s == pytest.approx(2 * plans[2].switch_s, rel=0.05)  # every rank's link at once


def test_a_model_that_does_not_fit_says_what_to_change(qwen32b):
    arch = load_model_arch(qwen32b)
    with pytest.raises(ValueError, match="does not fit one a100 .* use more ranks"):
        memory_plan(EngineConfig.from_kwargs(model=str(qwen32b), gpu_memory_utilization=0.5), arch, 8192, "a100")


def test_weight_bytes_count_each_parameter_once(tiny_model_dirs):
    from workers.models import build_model

    arch = load_model_arch(tiny_model_dirs["qwen3"])
    params = {id(p): p for p in build_model(arch).parameters()}  # tied embeddings are one parameter
    expected = sum(p.numel() for p in params.values()) * 4
    assert sharded_weight_bytes(arch, 1, 4) == expected
    assert sharded_weight_bytes(arch, 2, 4) < expected
