"""The user-facing API of the engine: sampling, stop rules, the step loop, and errors on bad input."""

from __future__ import annotations

import shutil

import pytest

from fs_engine import LLM, LLMEngine, SamplingParams
from tests.conftest import random_prompts


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    return LLM(tiny_model_dirs["qwen2"])


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    return random_prompts(512, [3 + 7 * i for i in range(n)], seed=seed)


# ---- sampling --------------------------------------------------------------------------------------------
def test_seeded_sampling_is_reproducible_whatever_the_batch(llm):
    prompts = _prompts(6)
    seeded = SamplingParams(max_tokens=24, temperature=0.9, top_p=0.95, seed=1234)
    alone = llm.generate([prompts[2]], seeded)[0].token_ids
    others = SamplingParams(max_tokens=30, temperature=1.0)  # unseeded neighbours with other lengths
    batch = llm.generate(prompts, [others, others, seeded, others, others, others])
    assert batch[2].token_ids == alone
    again = llm.generate([prompts[2]], seeded)[0].token_ids
    assert again == alone


def test_different_seeds_give_different_samples(llm):
    prompt = _prompts(1)[0]
    outs = [llm.generate([prompt], SamplingParams(max_tokens=16, temperature=1.0, seed=s))[0].token_ids
            for s in range(4)]
    assert len({tuple(o) for o in outs}) > 1


def test_top_k_one_equals_greedy(llm):
    prompts = _prompts(4, seed=9)
    greedy = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    top1 = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=1.3, top_k=1, ignore_eos=True))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


# ---- stop rules ------------------------------------------------------------------------------------------
def test_max_tokens_finishes_with_length(llm):
    out = llm.generate(_prompts(1), SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length" and out.finished


def test_stop_token_ids_stop_generation(llm):
    prompt = _prompts(1)[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].token_ids
    stop_at = free[10]
    first = free.index(stop_at)
    out = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                stop_token_ids=[stop_at]))[0]
    assert out.token_ids == free[: first + 1] and out.finish_reason == "stop"


def test_stop_string_cuts_the_text(llm):
    prompt = "The quick brown fox"
    free = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert len(free.text) > 12
    stop = free.text[8:11]
    out = llm.generate(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))[0]
    cut = free.text.find(stop)
    assert out.text == free.text[:cut] and out.finish_reason == "stop"
    assert len(out.token_ids) < len(free.token_ids)


def test_eos_stops_unless_ignored(tiny_model_dirs, hf_reference):
    """Find a prompt whose greedy continuation hits eos; the engine stops there, or runs on with ignore_eos."""
    model = tiny_model_dirs["qwen3"]
    ref = hf_reference(model)
    llm = LLM(model)
    eos = llm.engine.eos_token_ids
    for prompt in random_prompts(1000, [4] * 60, seed=11):
        expected = ref.greedy(prompt, 30)
        if expected[-1] in eos and len(expected) < 30:
            break
    else:
        pytest.fail("no prompt reached eos; pick another seed")
    out = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0))[0]
    assert out.token_ids == expected and out.finish_reason == "stop"
    longer = llm.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert len(longer.token_ids) == 30 and longer.token_ids[: len(expected)] == expected


def test_generation_stops_at_max_model_len(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], max_model_len=40)
    out = llm.generate([list(range(1, 31))], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 10 and out.finish_reason == "length"


# ---- the step loop ---------------------------------------------------------------------------------------
def test_engine_step_streams_and_abort_frees_blocks(tiny_model_dirs):
    engine = LLMEngine(tiny_model_dirs["qwen3"], num_gpu_blocks=64)
    params = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True)
    engine.add_request("a", [5, 6, 7], params)
    engine.add_request("b", list(range(100, 140)), params)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    for _ in range(5):
        for out in engine.step():
            assert out.token_ids[: len(seen[out.request_id])] == seen[out.request_id]
            seen[out.request_id] = out.token_ids
    assert len(seen["a"]) == 5 and len(seen["b"]) == 5
    assert engine.stats()["num_free_gpu_blocks"] < 64
    engine.abort("b")
    with pytest.raises(ValueError, match="unknown request id"):
        engine.abort("b")
    while engine.has_unfinished_requests():
        outs = engine.step()
        assert all(o.request_id == "a" for o in outs)
    stats = engine.stats()
    assert stats["num_free_gpu_blocks"] == 64
    assert stats["num_aborted_requests"] == 1 and stats["num_finished_requests"] == 1


def test_split_steps_give_the_outputs_of_step_and_hold_an_id_until_its_last_output_is_taken(tiny_model_dirs):
    """begin_step / take_outputs / end_step, as the server overlaps them, give the same tokens and texts as
    step(); a finished request's id stays taken until its final output has been taken."""
    model = tiny_model_dirs["qwen3"]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    prompts = {"a": "Hello there", "b": "Once upon a time"}
    reference = LLMEngine(model)
    for rid, prompt in prompts.items():
        reference.add_request(rid, prompt, params)
    expected = {}
    while reference.has_unfinished_requests():
        expected.update((o.request_id, (o.token_ids, o.text)) for o in reference.step() if o.finished)

    engine = LLMEngine(model)
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params)
    got, streamed = {}, {"a": [], "b": []}
    while engine.has_unfinished_requests():
        begun = engine.begin_step()
        for out in engine.take_outputs():  # the previous step's, while this one runs
            assert out.token_ids[: len(streamed[out.request_id])] == streamed[out.request_id]
            streamed[out.request_id] = out.token_ids
            if out.finished:
                got[out.request_id] = (out.token_ids, out.text)
        if begun:
            engine.end_step()
            if "a" not in got and "a" not in engine.scheduler.requests:  # finished, final output not taken
                with pytest.raises(ValueError, match="already in use"):
                    engine.add_request("a", "again", params)
    assert got == expected


def test_outputs_keep_input_order_and_batch_continuously(llm):
    prompts = _prompts(5, seed=4)
    lengths = [30, 2, 17, 1, 9]
    before = llm.stats()["num_steps"]
    outs = llm.generate(prompts, [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in lengths])
    assert [len(o.token_ids) for o in outs] == lengths
    assert [o.prompt_token_ids for o in outs] == prompts
    # batched: the whole call takes about as many steps as its longest request, not the sum
    assert llm.stats()["num_steps"] - before <= 31


# ---- bad input -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
    ],
)
def test_bad_sampling_params_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_prompts_raise_and_leave_nothing_queued(llm):
    engine = llm.engine
    free = engine.stats()["num_free_gpu_blocks"]
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[1, 2, 3], []])
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([[1] * engine.max_model_len])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10**6]])
    with pytest.raises(ValueError, match="string or a list of int"):
        llm.generate([3.5])
    assert not engine.has_unfinished_requests()
    assert engine.stats()["num_free_gpu_blocks"] == free


def test_bad_engine_arguments_raise(tiny_model_dirs, tmp_path):
    model = tiny_model_dirs["llama"]
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(model, max_num_seq=4)  # typo: the message suggests the right name
    with pytest.raises(ValueError, match="does not exist"):
        LLM(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="config.json"):
        LLM(tmp_path)
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(model, max_model_len=10**6)
    bad = tmp_path / "gpt2"
    shutil.copytree(model, bad)
    (bad / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(ValueError, match="unsupported architecture"):
        LLM(bad)


def test_request_that_can_never_fit_is_rejected(tiny_model_dirs):
    llm = LLM(tiny_model_dirs["llama"], num_gpu_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="KV blocks"):
        llm.generate([[1] * 10], SamplingParams(max_tokens=20))
    assert llm.generate([[1] * 10], SamplingParams(max_tokens=6, ignore_eos=True))[0].finish_reason == "length"


def test_checkpoint_without_tokenizer_serves_token_ids(tmp_path):
    from fs_engine.tiny_model import make_tiny_model

    model = make_tiny_model("qwen2", tmp_path / "bare", seed=2, with_tokenizer=False)
    llm = LLM(model)
    out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.text == ""
    with pytest.raises(ValueError, match="no tokenizer"):
        llm.generate("some text")


def test_default_model_generates():
    llm = LLM()  # the embedded tiny default model, generated into FS_ENGINE_CACHE on first use
    outs = llm.generate(["Hello", "Tell me a story"], SamplingParams(max_tokens=8, temperature=0))
    assert all(1 <= len(o.token_ids) <= 8 for o in outs)
    assert llm.engine.arch.family == "qwen3"


def test_bfloat16_runs_and_mostly_agrees_with_float32(tiny_model_dirs):
    """bfloat16 (the GPU default) on CPU: same code path, rounding may flip a late greedy token."""
    prompts = random_prompts(512, [8, 40], seed=6)
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    fp32 = LLM(tiny_model_dirs["llama"]).generate(prompts, params)
    bf16_llm = LLM(tiny_model_dirs["llama"], dtype="bfloat16")
    assert str(bf16_llm.engine.executor.worker.runner.kv_arena.dtype) == "torch.bfloat16"
    bf16 = bf16_llm.generate(prompts, params)
    assert all(len(o.token_ids) == 12 for o in bf16)
    assert any(a.token_ids[:2] == b.token_ids[:2] for a, b in zip(fp32, bf16))


def test_request_id_can_be_reused_right_after_it_finishes(tiny_model_dirs):
    engine = LLMEngine(tiny_model_dirs["qwen3"], num_gpu_blocks=64)
    params = SamplingParams(max_tokens=1, temperature=0)
    engine.add_request("x", [1, 2, 3], params)
    (first,) = engine.step()
    assert first.finished
    engine.add_request("x", [4, 5, 6], params)
    (second,) = engine.step()
    assert second.finished and second.prompt_token_ids == [4, 5, 6]


def test_dummy_weights_need_only_config_json(tiny_model_dirs, tmp_path):
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(tiny_model_dirs["llama"] / "config.json", config_only / "config.json")
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        LLM(str(config_only))
    with pytest.raises(ValueError, match="load_format"):
        LLM(str(config_only), load_format="random")
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    prompts = random_prompts(1000, [7, 30], seed=1)
    first = [o.token_ids for o in LLM(str(config_only), load_format="dummy").generate(prompts, params)]
    again = [o.token_ids for o in LLM(str(config_only), load_format="dummy").generate(prompts, params)]
    other = [o.token_ids for o in LLM(str(config_only), load_format="dummy", seed=1).generate(prompts, params)]
    assert first == again and first != other  # seeded: reproducible, and the seed matters
    assert all(len(t) == 12 for t in first)
