"""The sampler on hand-built logits: filters keep exactly the tokens they promise, seeded rows are reproducible
whatever they are batched with, and sampled frequencies follow the softmax."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ipc.messages import SamplingSpec  # noqa: E402
from workers.sampler import Sampler  # noqa: E402

CPU = torch.device("cpu")
GREEDY = SamplingSpec(temperature=0.0)


def sampler(seed: int = 0) -> Sampler:
    return Sampler(seed, CPU)


def random_logits(rows: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def frequencies(tokens: list[int], vocab: int) -> torch.Tensor:
    return torch.bincount(torch.tensor(tokens), minlength=vocab).float() / len(tokens)


def test_greedy_rows_return_the_argmax():
    logits = random_logits(6, 50, seed=0)
    assert sampler()(logits, [GREEDY] * 6, list(range(6))) == logits.argmax(-1).tolist()


def test_greedy_rows_stay_greedy_in_a_mixed_batch():
    logits = random_logits(8, 50, seed=1)
    specs = [GREEDY if r % 2 == 0 else SamplingSpec(temperature=5.0) for r in range(8)]
    out = sampler()(logits, specs, [0] * 8)
    argmax = logits.argmax(-1).tolist()
    assert [out[r] for r in range(0, 8, 2)] == [argmax[r] for r in range(0, 8, 2)]


@pytest.mark.parametrize("seed", range(20))
def test_top_k_one_is_greedy_for_any_seed(seed):
    logits = random_logits(4, 100, seed=seed)
    specs = [SamplingSpec(temperature=1.0, top_k=1, seed=seed), SamplingSpec(temperature=2.0, top_k=1)] * 2
    assert sampler(seed)(logits, specs, [seed] * 4) == logits.argmax(-1).tolist()


@pytest.mark.parametrize("k", [2, 5, 17])
def test_top_k_never_returns_a_token_outside_the_k_largest(k):
    vocab, rows = 64, 256
    logits = torch.randn(vocab, generator=torch.Generator().manual_seed(k)).expand(rows, vocab).contiguous()
    allowed = set(logits[0].topk(k).indices.tolist())
    # high temperature flattens the distribution, so a leak outside the top k would show up
    specs = [SamplingSpec(temperature=10.0, top_k=k, seed=s) for s in range(rows)]
    drawn = sampler()(logits, specs, list(range(rows)))
    assert set(drawn) <= allowed
    assert len(set(drawn)) == k  # and every one of them is reachable


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])  # sorted: 1 (0.4), 3 (0.3), 4 (0.15), 2 (0.1), 0 (0.05)
    logits = probs.log().expand(400, 5).contiguous()
    cases = {0.35: {1}, 0.65: {1, 3}, 0.75: {1, 3, 4}, 0.9: {1, 3, 4, 2}, 0.97: {0, 1, 2, 3, 4}}
    for top_p, nucleus in cases.items():
        specs = [SamplingSpec(temperature=1.0, top_p=top_p, seed=s) for s in range(400)]
        assert set(sampler()(logits, specs, [0] * 400)) == nucleus, top_p


def test_nucleus_that_reaches_top_p_exactly_stops_there():
    # powers of two: softmax and cumulative sums are exact, so the boundary is tested, not rounding
    logits = torch.tensor([0.5, 0.25, 0.125, 0.125]).log().expand(300, 4).contiguous()
    for top_p, nucleus in {0.5: {0}, 0.75: {0, 1}, 0.875: {0, 1, 2}}.items():
        specs = [SamplingSpec(temperature=1.0, top_p=top_p, seed=s) for s in range(300)]
        assert set(sampler()(logits, specs, [0] * 300)) == nucleus, top_p


def test_tiny_top_p_still_keeps_the_top_token():
    logits = random_logits(32, 100, seed=3)
    specs = [SamplingSpec(temperature=1.0, top_p=1e-9, seed=s) for s in range(32)]
    assert sampler()(logits, specs, list(range(32))) == logits.argmax(-1).tolist()


def test_top_k_and_top_p_combine():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().expand(300, 4).contiguous()
    # top_k=3 renormalises to 0.44, 0.33, 0.22; a nucleus of 0.7 then needs the first two
    specs = [SamplingSpec(temperature=1.0, top_k=3, top_p=0.7, seed=s) for s in range(300)]
    assert set(sampler()(logits, specs, [0] * 300)) == {0, 1}


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    vocab = 200
    target = random_logits(1, vocab, seed=5)
    spec = SamplingSpec(temperature=1.5, top_p=0.95, top_k=50, seed=1234)
    alone = [sampler(0)(target, [spec], [i])[0] for i in range(30)]
    assert len(set(alone)) > 1  # the draws are random, so the comparison below means something
    for i in range(30):
        others = random_logits(5, vocab, seed=100 + i)
        batch = torch.cat([others[:3], target, others[3:]])
        specs = [SamplingSpec(temperature=1.0), GREEDY, SamplingSpec(top_k=3, seed=9), spec,
                 SamplingSpec(temperature=0.7, top_p=0.5), SamplingSpec(seed=1234)]
        # a different engine seed, other rows, another position in the batch: the same token
        assert sampler(i)(batch, specs, [7, 7, i, i, 0, i + 1])[3] == alone[i]
        reversed_out = sampler(i + 1)(batch.flip(0), specs[::-1], [i + 1, 0, i, i, 7, 7])
        assert reversed_out[2] == alone[i]


def test_different_output_indices_give_different_draws():
    logits = torch.zeros(1, 1000)  # uniform: two equal draws in a row are a 1 in 1000 event
    spec = SamplingSpec(temperature=1.0, seed=77)
    draws = [sampler()(logits, [spec], [i])[0] for i in range(100)]
    assert len(set(draws)) > 90


def test_different_seeds_give_different_draws():
    logits = torch.zeros(1, 1000)
    draws = [sampler()(logits, [SamplingSpec(seed=s)], [0])[0] for s in range(100)]
    assert len(set(draws)) > 90


def test_unseeded_rows_follow_the_engine_seed():
    logits = torch.zeros(16, 1000)
    specs = [SamplingSpec()] * 16
    first = sampler(3)(logits, specs, [0] * 16)
    assert sampler(3)(logits, specs, [0] * 16) == first
    assert sampler(4)(logits, specs, [0] * 16) != first
    assert len(set(first)) > 12  # rows of one batch get independent noise


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_frequencies_match_softmax(temperature):
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 8000
    expected = (logits / temperature).softmax(-1)
    seeded = sampler()(logits.expand(n, 4), [SamplingSpec(temperature=temperature, seed=5)] * n, list(range(n)))
    unseeded = sampler(1)(logits.expand(n, 4), [SamplingSpec(temperature=temperature)] * n, [0] * n)
    for tokens in (seeded, unseeded):
        # 8000 draws: the standard error of each frequency is below 0.006
        torch.testing.assert_close(frequencies(tokens, 4), expected, atol=0.025, rtol=0)


def test_frequencies_after_top_k_are_renormalised():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n = 8000
    tokens = sampler()(logits.expand(n, 4), [SamplingSpec(top_k=2)] * n, [0] * n)
    expected = torch.tensor([2.0, 1.0]).softmax(-1)
    torch.testing.assert_close(frequencies(tokens, 4), torch.cat([expected, torch.zeros(2)]), atol=0.025, rtol=0)


def test_tiny_temperature_samples_greedily():
    """logits / 1e-40 overflows float32; such temperatures must behave as their limit, argmax."""
    import torch

    from ipc.messages import SamplingSpec
    from workers.sampler import Sampler

    logits = torch.tensor([[0.1, 3.0, -2.0, 2.9], [5.0, 1.0, 0.0, 4.0]])
    sampler = Sampler(seed=0, device=torch.device("cpu"))
    specs = [SamplingSpec(temperature=1e-40, seed=3), SamplingSpec(temperature=1e-9)]
    assert sampler(logits, specs, [0, 0]) == [1, 0]


def test_penalties_follow_their_definitions_row_by_row_and_leave_the_input_alone():
    from ipc.messages import SamplingSpec
    from workers.sampler import SeenTokens, apply_penalties

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [1.0, 1.0, 1.0, 1.0], [4.0, -2.0, 0.0, 1.0]])
    original = logits.clone()
    both = SeenTokens([0, 1], torch.device("cpu"))
    for token in (1, 3, 3):  # token 1 is in the prompt and the output: penalized once for repetition
        both.add(token)
    only_output = SeenTokens([], torch.device("cpu"))
    only_output.add(2)
    specs = [SamplingSpec(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25), SamplingSpec(),
             SamplingSpec(presence_penalty=1.0)]
    out = apply_penalties(logits, specs, [both, None, only_output])
    assert torch.equal(logits, original)
    expected = original.clone()
    expected[0] = torch.tensor([2.0 / 2, -1.0 * 2 - (0.5 + 0.25), 0.5, 3.0 / 2 - (2 * 0.5 + 0.25)])
    expected[2, 2] -= 1.0
    assert torch.allclose(out, expected)
