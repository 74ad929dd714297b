"""The simulated executor: virtual time for copies and steps, queueing, stalls, sizing, tokens."""

import pytest

from fs_engine.config import EngineConfig
from fs_engine.model_config import parse_model_arch
from fs_engine.sim.cost_model import StepShape
from fs_engine.sim.devices import DeviceProfile
from fs_engine.sim.executor import SimExecutor, activation_bytes
from ipc.messages import ScheduledChunk, StepPlan, SwapCommand

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
    "rope_theta": 500000.0, "eos_token_id": [128001, 128009],
}
BLOCK_BYTES = 2 << 20  # Llama-3-8B, 16 tokens, bf16


@pytest.fixture
def profile_path(tmp_path):
    profile = DeviceProfile("toy", 24 * 2**30, 100e12, 1e12, None, pcie_bw=10e9, dma_latency_s=1e-6, submit_s=2e-6,
                            duplex_factor=0.8, attn_compute_eff=0.5, attn_memory_eff=0.5, gemm_compute_eff=0.8,
                            gemm_memory_eff=0.9, copy_interference=0.1)
    path = tmp_path / "toy.json"
    profile.save(path)
    return path


def make(profile_path, **kwargs) -> SimExecutor:
    config = EngineConfig.from_kwargs(model="unused", device=f"sim:{profile_path}", **kwargs)
    return SimExecutor(config, parse_model_arch(LLAMA_8B), 8192)


def decode_chunks(n: int, context: int = 100) -> list[ScheduledChunk]:
    return [ScheduledChunk(f"r{i}", [7], context - 1, list(range(-(-context // 16))), sample=True) for i in range(n)]


def test_sync_swap_stalls_the_step_by_the_copy_time(profile_path):
    sim = make(profile_path)
    swap = SwapCommand(1, "out", [(0, 0, 4)], wait=True)
    result = sim.execute(StepPlan(1, chunks=decode_chunks(2), swaps=[swap]))
    copy = sim.cost.copy_s(1, 4 * BLOCK_BYTES)
    assert result.swap_wait_s == pytest.approx(copy)
    assert [d.swap_id for d in result.swaps_done] == [1]
    # the forward runs after the copy, so no interference
    forward = sim.cost.step_s(StepShape([1, 1], [100, 100], 2, graph_batch=2))
    assert result.execute_s == pytest.approx(copy + forward)
    assert sim.clock.now() == pytest.approx(copy + forward)


def test_async_swap_is_reported_by_the_first_result_after_it_lands(profile_path):
    sim = make(profile_path)
    big = SwapCommand(1, "out", [(0, 0, 500)])  # 1 GiB: about 0.1 s on the toy link
    copy = sim.cost.copy_s(1, 500 * BLOCK_BYTES)
    result = sim.execute(StepPlan(1, chunks=decode_chunks(1), swaps=[big]))
    assert result.swap_wait_s == 0
    step = 1
    while not result.swaps_done:
        assert sim.clock.now() < copy  # not reported before it landed
        step += 1
        result = sim.execute(StepPlan(step, chunks=decode_chunks(1)))
    assert sim.clock.now() - result.execute_s < copy <= sim.clock.now()  # ... and by the step it landed in
    assert result.swaps_done[0].seconds == pytest.approx(copy)
    assert sim.stats()["sim_copy_out_busy_s"] == pytest.approx(copy, rel=1e-4)


def test_a_plan_with_nothing_to_compute_waits_for_a_copy(profile_path):
    """As the worker does (it blocks on one copy instead of spinning)."""
    sim = make(profile_path)
    result = sim.execute(StepPlan(1, swaps=[SwapCommand(1, "in", [(0, 0, 10)])]))
    assert [d.swap_id for d in result.swaps_done] == [1]
    assert sim.clock.now() == pytest.approx(sim.cost.copy_s(1, 10 * BLOCK_BYTES))
    sim.execute(StepPlan(2))  # nothing at all: the host still spends a loop
    assert sim.clock.now() > sim.cost.copy_s(1, 10 * BLOCK_BYTES)


def in_flight_ends(sim: SimExecutor) -> dict[int, float]:
    return {i: end for i, (end, _) in sim._in_flight.items()}  # noqa: SLF001 - the copy engines' schedule


def test_commands_queue_per_direction(profile_path):
    sim = make(profile_path)
    one = sim.cost.copy_s(1, 1000 * BLOCK_BYTES)  # each outlasts the step
    swaps = [SwapCommand(1, "out", [(0, 0, 1000)]), SwapCommand(2, "out", [(1000, 1000, 1000)])]
    sim.execute(StepPlan(1, chunks=decode_chunks(1), swaps=swaps))
    assert in_flight_ends(sim)[2] == pytest.approx(2 * one)  # FIFO behind command 1


def test_both_directions_at_once_share_the_link_by_the_duplex_factor(profile_path):
    sim = make(profile_path)
    one = sim.cost.copy_s(1, 1000 * BLOCK_BYTES)
    swaps = [SwapCommand(1, "out", [(0, 0, 1000)]), SwapCommand(2, "in", [(0, 2000, 1000)])]
    sim.execute(StepPlan(1, chunks=decode_chunks(1), swaps=swaps))
    ends = in_flight_ends(sim)
    assert ends[1] == pytest.approx(one)
    assert ends[2] == pytest.approx(one / 0.8)  # it overlapped command 1 all the way


def test_copies_slow_an_overlapping_step_by_the_interference_factor(profile_path):
    sim = make(profile_path)
    forward = sim.cost.step_s(StepShape([1], [100], 1, graph_batch=1))
    long_copy = SwapCommand(1, "out", [(0, 0, 1000)])  # outlasts the step
    result = sim.execute(StepPlan(1, chunks=decode_chunks(1), swaps=[long_copy]))
    assert result.execute_s == pytest.approx(forward * 1.1)


def test_decode_batches_pad_to_the_captured_graph_sizes_unless_eager(profile_path):
    sim = make(profile_path)
    padded = sim.cost.step_s(StepShape([1] * 3, [100] * 3, 3, graph_batch=4))
    assert sim.execute(StepPlan(1, chunks=decode_chunks(3))).execute_s == pytest.approx(padded)
    eager = make(profile_path, enforce_eager=True)
    assert eager.execute(StepPlan(1, chunks=decode_chunks(3))).execute_s == pytest.approx(
        eager.cost.step_s(StepShape([1] * 3, [100] * 3, 3)))
    prefill = [ScheduledChunk("p", list(range(300)), 0, list(range(19)), sample=True)]
    assert sim.execute(StepPlan(2, chunks=prefill)).execute_s == pytest.approx(
        sim.cost.step_s(StepShape([300], [300], 1)))


def test_kv_capacity_is_device_memory_less_weights_activations_and_overhead(profile_path):
    sim = make(profile_path, max_num_seqs=256, cpu_kv_gb=60)
    budget = int(24 * 2**30 * 0.9) - sim.shape.num_params() * 2 - activation_bytes(sim.shape, 2048, 256, 2) - 2**30
    assert sim.num_blocks == budget // BLOCK_BYTES
    assert sim.num_cpu_blocks == 60 * 2**30 // BLOCK_BYTES
    assert make(profile_path, num_gpu_blocks=100).num_blocks == 100
    assert make(profile_path, kv_cache_memory_gb=1.0).num_blocks == 512
    with pytest.raises(ValueError, match="no memory left for the KV cache"):
        make(profile_path, gpu_memory_utilization=0.5)


def test_sampled_tokens_are_a_fixed_function_of_the_context(profile_path):
    sim = make(profile_path)
    chunks = [ScheduledChunk("a", [5, 6, 9], 0, [0], sample=True), ScheduledChunk("b", [9], 2, [1], sample=True),
              ScheduledChunk("c", [1, 2], 0, [2], sample=False)]
    result = sim.execute(StepPlan(1, chunks=chunks))
    assert result.request_ids == ["a", "b"]
    assert result.token_ids[0] == result.token_ids[1] == sim.fake_token(9, 3)  # same last token and position
    assert all(0 <= t < 128256 for t in result.token_ids)
    for last in range(2000):
        assert sim.fake_token(last, 17) not in (128001, 128009)


def test_unknown_simulated_device_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown simulated device 'tpu'"):
        EngineConfig.from_kwargs(model="x", device="sim:tpu")
    with pytest.raises(ValueError, match="sim:<gpu>"):
        EngineConfig.from_kwargs(model="x", device="gpu")
