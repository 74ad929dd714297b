"""Each term of the simulated device's cost model against its closed form."""

import math

import numpy as np
import pytest

from fs_engine.sim.cost_model import (
    CostModel,
    ModelShape,
    StepShape,
    copy_calls,
    find_vidur_profile,
    fitted_efficiency,
    vidur_profiles,
)
from fs_engine.sim.devices import PROFILES, VIDUR_PEAKS, DeviceProfile, get_profile

LLAMA3_8B = ModelShape(32, 4096, 14336, 32, 8, 128, 128256)
QWEN25_32B = ModelShape(64, 5120, 27648, 40, 8, 128, 152064)


def toy_profile(**changes) -> DeviceProfile:
    """Round numbers, fixed efficiencies and no Vidur data, so every term has an exact closed form."""
    base = DeviceProfile("toy", 16 * 2**30, 100e12, 1e12, None, pcie_bw=10e9, dma_latency_s=1e-6, submit_s=2e-6,
                         duplex_factor=0.8, attn_compute_eff=0.5, attn_memory_eff=0.5, gemm_compute_eff=0.8,
                         gemm_memory_eff=0.9, step_host_s=1e-3, seq_host_s=1e-5, kernel_launch_s=5e-6,
                         kernels_per_layer=10, graph_launch_s=2e-5)
    return base.with_updates(**changes)


def test_gemm_is_the_slower_of_compute_and_memory():
    cost = CostModel(toy_profile(), LLAMA3_8B)
    m, k, n = 4096, 4096, 14336
    compute = 2 * m * k * n / (100e12 * 0.8)
    memory = 2 * (k * n + m * k + m * n) / (1e12 * 0.9)
    assert cost.gemm_s(m, k, n) == pytest.approx(max(compute, memory))
    # one token: reading the weights dominates
    assert cost.gemm_s(1, k, n) == pytest.approx(2 * (k * n + k + n) / (1e12 * 0.9))


def test_attention_flops_are_causal_within_a_chunk():
    cost = CostModel(toy_profile(), LLAMA3_8B)
    per_pair = 4 * 32 * 128  # QK^T and PV over 32 heads of 128
    assert cost.attention_flops([1], [100]) == pytest.approx(per_pair * 1 * 99.0 + per_pair * 1)  # decode: c keys
    q, c = 512, 2048  # a chunk of 512 new tokens after 1536 cached ones
    assert cost.attention_flops([q], [c]) == pytest.approx(per_pair * q * ((c - q) + (q + 1) / 2))


def test_decode_attention_reads_every_cached_token_once():
    cost = CostModel(toy_profile(), LLAMA3_8B)
    kv = 1000 * 2 * 8 * 128 * 2  # K and V of 1,000 tokens, 8 kv heads of 128, bf16
    qo = 1 * 2 * 32 * 128 * 2
    assert cost.attention_bytes([1], [1000]) == kv + qo
    assert cost.attention_s([1], [1000]) == pytest.approx((kv + qo) / (1e12 * 0.5))


def test_step_time_adds_host_costs_to_the_slower_of_device_and_launches():
    profile = toy_profile()
    cost = CostModel(profile, LLAMA3_8B)
    eager = StepShape([1] * 4, [100] * 4, 4)
    device = cost.device_s(eager)
    launches = 10 * 32 * 5e-6
    assert cost.step_s(eager) == pytest.approx(1e-3 + 4 * 1e-5 + max(device, launches))
    graph = StepShape([1] * 3, [100] * 3, 3, graph_batch=4)
    assert cost.launch_s(graph) == 2e-5
    # a graph computes its padded rows: the linear layers see 4 rows, not 3
    assert cost.device_s(graph) == pytest.approx(32 * (cost.linear_s(4) + cost.attention_s([1] * 3, [100] * 3))
                                                 + cost.emb_s(4) + cost.lm_head_s(4))


def test_device_time_is_layers_times_a_layer_plus_embedding_and_lm_head():
    cost = CostModel(toy_profile(), LLAMA3_8B)
    step = StepShape([300, 1, 1], [300, 50, 70], 3)
    per_layer = cost.linear_s(302) + cost.attention_s([300, 1, 1], [300, 50, 70])
    assert cost.device_s(step) == pytest.approx(32 * per_layer + cost.emb_s(302) + cost.lm_head_s(3))
    assert cost.lm_head_s(3) == pytest.approx(cost.gemm_s(3, 4096, 128256))
    assert cost.lm_head_s(0) == 0.0


def test_copy_time_is_per_call_latency_plus_bytes_over_bandwidth_and_at_least_the_submissions():
    cost = CostModel(toy_profile(), LLAMA3_8B)
    assert cost.copy_device_s(2, 20_000_000) == pytest.approx(2 * 1e-6 + 20_000_000 / 10e9)
    assert cost.copy_s(2, 20_000_000) == pytest.approx(2 * 1e-6 + 2e-3)
    # 10,000 copies of 1 KB: issuing them (2 us each) is slower than moving them
    assert cost.copy_s(10_000, 10_000_000) == pytest.approx(10_000 * 2e-6)


def test_copy_calls_per_granularity_match_the_copier():
    runs = [(0, 10, 3), (7, 20, 2)]
    assert copy_calls("group", runs, 32) == 2
    assert copy_calls("block", runs, 32) == 5
    assert copy_calls("block_layer", runs, 32) == 5 * 32 * 2


def test_small_copies_reach_a_fraction_of_the_link():
    """dma_latency_s sets the half-bandwidth copy size: vLLM v0's 32 KiB copies get about a third of PCIe 4.0,
    a 2 MiB block nearly all of it (calibration/pcie.md: DMA efficiency falls below about 0.5 MB)."""
    cost = CostModel(PROFILES["a100"], LLAMA3_8B)
    def bandwidth(b: int) -> float:
        return b / cost.copy_device_s(1, b)
    assert 0.3 < bandwidth(32 << 10) / 25e9 < 0.4
    assert bandwidth(2 << 20) / 25e9 > 0.95


def test_vidur_shapes_use_the_measured_medians():
    profile = find_vidur_profile("a100", LLAMA3_8B)
    assert profile is not None and profile.model == "meta-llama/Meta-Llama-3-8B"
    cost = CostModel(PROFILES["a100"], LLAMA3_8B)
    tokens = int(profile.num_tokens[5])
    expected = sum(profile.op_s[op][5] for op in profile.op_s if op not in ("emb", "add")) + 2 * profile.op_s["add"][5]
    assert cost.linear_s(tokens) == pytest.approx(expected)
    assert find_vidur_profile("a100", QWEN25_32B) is None  # not profiled: roofline


@pytest.mark.parametrize("tokens", [1, 64, 512, 4096])
def test_roofline_agrees_with_vidur_where_both_exist(tokens):
    """The fitted roofline stands in for shapes Vidur did not profile; where it did, they agree within 25%."""
    cost = CostModel(PROFILES["a100"], LLAMA3_8B)
    measured = cost.vidur.linear_s(tokens)
    assert cost.roofline_linear_s(tokens) == pytest.approx(measured, rel=0.25)


def test_fitted_efficiencies_are_fractions_of_the_profiled_gpus_peaks():
    for gpu in VIDUR_PEAKS:
        eff = fitted_efficiency(gpu)
        assert 0.5 < eff.gemm_compute < 0.95 and 0.5 < eff.gemm_memory < 0.95, (gpu, eff)
        assert 0 < eff.min_kernel_s < 50e-6
    # the A10 borrows the A40's fractions and applies them to its own, lower peaks
    a10 = CostModel(PROFILES["a10"], LLAMA3_8B)
    a40_like = CostModel(PROFILES["a10"].with_updates(peak_flops=150e12, memory_bw=696e9), LLAMA3_8B)
    assert a10.eff == a40_like.eff
    assert a10.linear_s(4096) / a40_like.linear_s(4096) == pytest.approx(150 / 125, rel=0.02)


def test_vidur_table_is_complete():
    profiles = vidur_profiles()
    assert {p.gpu for p in profiles} == {"a40", "a100", "h100"}
    for p in profiles:
        assert np.all(np.diff(p.num_tokens) > 0) and set(p.op_s) >= {"attn_pre_proj", "mlp_down_proj"}


def test_published_decode_figures_are_in_range():
    """Batch-1 decode is bound by reading the weights: 16 GB of Llama-3-8B at the GPU's bandwidth."""
    for name, floor_ms in (("a10", 16.06e9 / 600e9 * 1e3), ("a100", 16.06e9 / 2039e9 * 1e3)):
        cost = CostModel(PROFILES[name], LLAMA3_8B)
        ms = cost.step_s(StepShape([1], [512], 1, graph_batch=1)) * 1e3
        assert floor_ms < ms < 1.6 * floor_ms, (name, ms)


def test_model_shape_counts_parameters_and_kv_bytes():
    assert LLAMA3_8B.num_params() / 1e9 == pytest.approx(8.03, abs=0.01)
    assert QWEN25_32B.num_params() / 1e9 == pytest.approx(32.76, abs=0.01)
    assert LLAMA3_8B.kv_bytes_per_token(2) == 128 * 1024  # 128 KiB per token (DESIGN.md)


def test_profiles_round_trip_and_unknown_names_fail_clearly(tmp_path):
    path = tmp_path / "dev.json"
    PROFILES["h100"].save(path)
    assert get_profile(str(path)) == PROFILES["h100"]
    with pytest.raises(ValueError, match="a10, .*a100, .*calibrate"):
        get_profile("b200")
    path.write_text('{"name": "x", "bogus": 1}')
    with pytest.raises(ValueError, match="bogus"):
        get_profile(str(path))
    assert math.isclose(PROFILES["h200"].memory_bw, 4800e9)


def test_a_serial_profile_is_exactly_linear_in_the_features():
    """bench calibrate fits coefficients of CostModel.features; the profile it writes must reproduce them."""
    from fs_engine.sim.calibrate import FEATURES, serial_profile

    coefficients = dict(zip(FEATURES, (2e-3, 1e-4, 5e-3, 3e-4, 1e-10, 1e-9, 5e-11, 7e-10)))
    base = toy_profile(dtype_bytes=4, kernels_per_layer=0)
    profile = serial_profile("cpu", coefficients, base)
    cost = CostModel(profile, LLAMA3_8B)
    for step in (StepShape([1] * 5, [40, 300, 7, 1000, 64], 5), StepShape([256], [256], 1),
                 StepShape([1, 1, 128], [50, 60, 300], 3), StepShape([33], [100], 0, async_commands=2)):
        features = cost.features(step)
        assert cost.step_s(step) == pytest.approx(sum(coefficients[k] * features[k] for k in FEATURES), rel=1e-9)


def test_nnls_keeps_coefficients_non_negative():
    from fs_engine.sim.calibrate import fit_copies, nnls

    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert nnls(a, np.array([1.0, -1.0, 0.0])).tolist() == pytest.approx([0.5, 0.0])
    shapes = ((1, 1 << 20), (64, 1 << 21), (1, 1 << 26), (512, 1 << 24))
    copies = [(calls, n, calls * 3e-6 + n / 5e9) for calls, n in shapes]
    latency, bandwidth = fit_copies(copies)
    assert latency == pytest.approx(3e-6) and bandwidth == pytest.approx(5e9)


# ---- tensor parallelism ----------------------------------------------------------------------------------
def _sharded(shape: ModelShape, tp: int) -> ModelShape:
    return ModelShape(shape.num_layers, shape.hidden, shape.intermediate, shape.num_heads, shape.num_kv_heads,
                      shape.head_dim, shape.vocab, tp)


@pytest.mark.parametrize("device", ["a100", "h100", "h200"])
def test_a_sharded_step_pays_its_all_reduces_and_runs_faster_than_one_rank(device):
    decode = StepShape([1] * 64, [2048] * 64, 64, 64, 0)
    one = CostModel(get_profile(device), QWEN25_32B)
    assert one.comm_s(64, 64) == 0.0
    times = {}
    for tp in (2, 4, 8):
        cost = CostModel(get_profile(device), _sharded(QWEN25_32B, tp))
        hidden_bytes = 64 * QWEN25_32B.hidden * 2
        collective = cost.allreduce_s(hidden_bytes)
        assert 5e-6 < collective < 1e-3  # tens of microseconds for half a megabyte over NVLink
        logits = 0.5 * cost.allreduce_s(64 * QWEN25_32B.vocab * 2)
        assert cost.comm_s(64, 64) == pytest.approx((2 * QWEN25_32B.num_layers + 1) * collective + logits)
        times[tp] = cost.step_s(decode)
        assert cost.shape.num_params() < one.shape.num_params() / tp * 1.01  # each rank holds its share
    assert one.step_s(decode) > times[2] > times[8]


def test_all_reduce_time_grows_with_size_and_follows_the_profile_beyond_it():
    cost = CostModel(get_profile("a100"), _sharded(LLAMA3_8B, 2))
    small, large = cost.allreduce_s(4096), cost.allreduce_s(32 << 20)
    assert small < large
    biggest = 67108864
    assert cost.allreduce_s(2 * biggest) == pytest.approx(2 * cost.allreduce_s(biggest))


def test_a_device_without_an_all_reduce_profile_cannot_simulate_ranks():
    cost = CostModel(get_profile("a10"), _sharded(LLAMA3_8B, 2))
    with pytest.raises(ValueError, match="no all-reduce profile: simulate tensor_parallel_size=2 on a100"):
        cost.allreduce_s(4096)
    assert CostModel(get_profile("a10"), LLAMA3_8B).allreduce_s(4096) == 0.0
