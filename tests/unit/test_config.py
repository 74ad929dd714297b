"""Engine and sampling configuration: user mistakes are rejected at the edge with a message naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from fs_engine.config import AREAS, CacheConfig, DeviceConfig, EngineConfig, ModelConfig, SchedulerConfig
from fs_engine.sampling_params import SamplingParams


def test_from_kwargs_routes_each_argument_to_its_area():
    config = EngineConfig.from_kwargs(
        model="/m", tokenizer="/t", dtype="float16", max_model_len=512, seed=7,
        block_size=32, num_gpu_blocks=100, kv_cache_memory_gb=1.5, gpu_memory_utilization=0.5,
        max_num_seqs=4, max_num_batched_tokens=256,
        device="cpu", attention_backend="torch",
    )
    assert config.model == ModelConfig(model="/m", tokenizer="/t", dtype="float16", max_model_len=512, seed=7)
    assert config.cache == CacheConfig(
        block_size=32, num_gpu_blocks=100, kv_cache_memory_gb=1.5, gpu_memory_utilization=0.5
    )
    assert config.scheduler == SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=256)
    assert config.device == DeviceConfig(device="cpu", attention_backend="torch")


def test_from_kwargs_leaves_unnamed_fields_at_their_defaults():
    config = EngineConfig.from_kwargs(model="/m", max_num_seqs=3)
    assert config.scheduler.max_num_seqs == 3
    assert config.scheduler.max_num_batched_tokens == SchedulerConfig().max_num_batched_tokens
    assert config.cache == CacheConfig()
    assert config.device == DeviceConfig()


def test_field_names_are_unique_across_areas():
    # from_kwargs routes by name alone, so two areas owning one name would silently drop a value
    areas = tuple(AREAS.values())
    names = [f.name for cls in areas for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    assert set(EngineConfig.field_names()) == set(names)


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("max_num_seq", "max_num_seqs"), ("blocksize", "block_size"), ("gpu_mem_utilization", "gpu_memory_utilization")],
)
def test_unknown_argument_names_the_key_and_suggests_the_close_match(typo, suggestion):
    with pytest.raises(ValueError) as err:
        EngineConfig.from_kwargs(model="/m", **{typo: 1})
    message = str(err.value)
    assert repr(typo) in message
    assert f"did you mean {suggestion!r}" in message


def test_unknown_argument_without_close_match_still_raises():
    with pytest.raises(ValueError, match="'zzzz'"):
        EngineConfig.from_kwargs(model="/m", zzzz=1)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("block_size", 0),
        ("block_size", 12),
        ("block_size", -16),
        ("num_gpu_blocks", 0),
        ("kv_cache_memory_gb", 0.0),
        ("kv_cache_memory_gb", -1.0),
        ("gpu_memory_utilization", 1.5),
        ("gpu_memory_utilization", 0.0),
        ("dtype", "int8"),
        ("max_model_len", 0),
        ("max_num_seqs", 0),
        ("max_num_batched_tokens", 0),
        ("device", "tpu"),
        ("attention_backend", "flashinfer"),
    ],
)
def test_invalid_value_raises_naming_the_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        EngineConfig.from_kwargs(model="/m", **{field: value})
    message = str(err.value)
    assert f"{field}=" in message
    assert repr(value) in message


@pytest.mark.parametrize("block_size", [1, 2, 16, 64, 256])
def test_power_of_two_block_sizes_are_accepted(block_size):
    assert EngineConfig.from_kwargs(model="/m", block_size=block_size).cache.block_size == block_size


def test_boundary_values_are_accepted():
    config = EngineConfig.from_kwargs(model="/m", gpu_memory_utilization=1.0, max_num_seqs=1, max_num_batched_tokens=1)
    assert config.cache.gpu_memory_utilization == 1.0
    assert config.scheduler.max_num_seqs == 1


def test_configs_are_frozen():
    config = EngineConfig.from_kwargs(model="/m")
    for obj, name, value in [
        (config, "cache", CacheConfig()),
        (config.model, "dtype", "float16"),
        (config.cache, "block_size", 32),
        (config.scheduler, "max_num_seqs", 1),
        (config.device, "device", "cpu"),
    ]:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, value)


# ---- SamplingParams --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -3}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 1.5}, "top_k"),
        ({"seed": 1.5}, "seed"),
        ({"stop": [""]}, "stop"),
        ({"stop": ["ok", 3]}, "stop"),
    ],
)
def test_sampling_params_reject_invalid_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_stop_as_single_string_becomes_a_one_element_tuple():
    params = SamplingParams(stop="\n\n")
    assert params.stop == ("\n\n",)  # not ('\n', '\n'): a string must not be split into characters


def test_stop_lists_become_tuples():
    params = SamplingParams(stop=["a", "bc"], stop_token_ids=[3, 4])
    assert params.stop == ("a", "bc")
    assert params.stop_token_ids == (3, 4)
    hash(params)  # tuples keep params hashable


def test_disabled_filters_and_greedy_are_valid():
    params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0)
    spec = params.to_spec()
    assert spec.greedy
    assert (spec.top_p, spec.top_k, spec.seed) == (1.0, 0, None)


def test_to_spec_carries_sampling_settings():
    spec = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, seed=11).to_spec()
    assert (spec.temperature, spec.top_p, spec.top_k, spec.seed) == (0.7, 0.9, 5, 11)
    assert not spec.greedy


def test_sampling_params_are_frozen():
    with pytest.raises(ValueError, match="frozen"):
        SamplingParams().max_tokens = 5  # type: ignore[misc]


@pytest.mark.parametrize("kwargs", [{"max_num_seqs": 2.5}, {"block_size": "16"}, {"block_size": 16.0},
                                    {"num_gpu_blocks": True}, {"dtype": 16}])
def test_wrong_types_raise_value_error_naming_the_field(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=name):
        EngineConfig.from_kwargs(model="m", **kwargs)


@pytest.mark.parametrize("temperature", [float("nan"), -1e-9])
def test_nan_or_negative_temperature_is_rejected(temperature):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=temperature)
