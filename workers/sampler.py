"""Token sampling: greedy, temperature, top-k, top-p, with per-request seeds.

Sampling uses the exponential race: ``argmax(probs / E)`` with ``E ~ Exp(1)`` draws from ``probs`` exactly.
A seeded request draws its noise from a generator keyed on (seed, output index), so its tokens depend on
nothing but its own logits: not on batch composition, not on preemption and recompute.
"""

from __future__ import annotations

import torch

from ipc.messages import SamplingSpec

_SEED_STRIDE = 1_000_003  # mixes the output index into the seed; any odd constant larger than max_tokens


class Sampler:
    def __init__(self, seed: int, device: torch.device) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, specs: list[SamplingSpec], indices: list[int],
                 seen: list[SeenTokens | None] | None = None) -> list[int]:
        """logits: [num_rows, vocab] float32; specs/indices: per row; ``seen``: per row, what its penalties
        apply to (None for a row without penalties). Returns one token id per row."""
        if seen is not None:
            logits = apply_penalties(logits, specs, seen)
        greedy_tokens = logits.argmax(dim=-1)
        if all(spec.greedy for spec in specs):
            return greedy_tokens.tolist()
        probs = self._probabilities(logits, specs)
        noise = torch.empty_like(probs)
        for row, (spec, index) in enumerate(zip(specs, indices)):
            if spec.seed is None:
                noise[row].exponential_(generator=self.generator)
            else:
                gen = torch.Generator(device=self.device)
                gen.manual_seed((spec.seed * _SEED_STRIDE + index) % (2**63))
                noise[row].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = torch.tensor([spec.greedy for spec in specs], device=logits.device)
        return torch.where(is_greedy, greedy_tokens, sampled).tolist()

    @staticmethod
    def logprobs(logits: torch.Tensor, specs: list[SamplingSpec],
                 tokens: list[int]) -> tuple[list[list[int]], list[list[float]]]:
        """Per row: the sampled token and the row's ``spec.logprobs`` most likely tokens, ids and
        log-probabilities under the model's own distribution (before penalties, temperature and filters); an empty pair
        for a row that did not ask. Both empty when no row asked (nothing is computed)."""
        wanted = [row for row, spec in enumerate(specs) if spec.logprobs >= 0]
        if not wanted:
            return [], []
        rows = torch.tensor(wanted, device=logits.device)
        logp = logits.index_select(0, rows).float().log_softmax(dim=-1)
        sampled = logp.gather(1, torch.tensor([tokens[r] for r in wanted], device=logits.device)[:, None])
        k = max(specs[r].logprobs for r in wanted)
        top_values, top_ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
        sampled, top_values, top_ids = sampled.tolist(), top_values.tolist(), top_ids.tolist()  # one sync each
        ids: list[list[int]] = [[] for _ in specs]
        values: list[list[float]] = [[] for _ in specs]
        for i, row in enumerate(wanted):
            n = specs[row].logprobs
            ids[row] = [tokens[row], *top_ids[i][:n]]
            values[row] = [*sampled[i], *top_values[i][:n]]
        return ids, values

    def _probabilities(self, logits: torch.Tensor, specs: list[SamplingSpec]) -> torch.Tensor:
        temps = torch.tensor([spec.temperature or 1.0 for spec in specs], device=logits.device)
        logits = logits / temps[:, None]
        top_k = [spec.top_k for spec in specs]
        top_p = [spec.top_p for spec in specs]
        if any(k > 0 for k in top_k) or any(p < 1.0 for p in top_p):
            logits = _apply_top_k_top_p(logits, top_k, top_p)
        return logits.softmax(dim=-1)


class SeenTokens:
    """What a penalized request's penalties apply to: its prompt's distinct tokens (repetition penalty; on the
    device once, so a step costs nothing per prompt token on the host) and how often it has generated each
    token, kept by the worker as it samples."""

    def __init__(self, prompt_token_ids: list[int], device: torch.device) -> None:
        self.prompt = torch.tensor(sorted(set(prompt_token_ids)), dtype=torch.long, device=device)
        self.counts: dict[int, int] = {}

    def add(self, token: int) -> None:
        self.counts[token] = self.counts.get(token, 0) + 1


def apply_penalties(logits: torch.Tensor, specs: list[SamplingSpec], seen: list[SeenTokens | None]) -> torch.Tensor:
    """The rows' logits with their presence, frequency and repetition penalties applied (a copy; the input is
    left as the model gave it, for logprobs). Every penalized row's tokens go in one indexed update per kind."""
    rows = [r for r, spec in enumerate(specs) if spec.penalized and seen[r] is not None]
    if not rows:
        return logits
    logits = logits.clone()
    device = logits.device
    # repetition: each row's prompt tokens (device tensors) and output tokens (one in the prompt too comes
    # twice, and both writes are the same value); presence and frequency: the output tokens
    rep_rows, rep_ids = [], []
    rep_out_rows, rep_out_ids = [], []
    sub_rows, sub_ids, sub_values = [], [], []
    for r in rows:
        spec, tokens = specs[r], seen[r]
        if spec.repetition_penalty != 1:
            rep_rows.append(torch.full_like(tokens.prompt, r))
            rep_ids.append(tokens.prompt)
            rep_out_rows += [r] * len(tokens.counts)
            rep_out_ids += tokens.counts.keys()
        if (spec.presence_penalty or spec.frequency_penalty) and tokens.counts:
            sub_rows += [r] * len(tokens.counts)
            sub_ids += tokens.counts.keys()
            sub_values += [spec.frequency_penalty * n + spec.presence_penalty for n in tokens.counts.values()]
    if rep_ids:
        rep_rows.append(torch.tensor(rep_out_rows, dtype=torch.long, device=device))
        rep_ids.append(torch.tensor(rep_out_ids, dtype=torch.long, device=device))
        index = (torch.cat(rep_rows), torch.cat(rep_ids))
        per_row = torch.tensor([spec.repetition_penalty for spec in specs], device=device, dtype=logits.dtype)
        factor = per_row[index[0]]
        values = logits[index]
        logits[index] = torch.where(values > 0, values / factor, values * factor)
    if sub_ids:
        index = (torch.tensor(sub_rows, device=device), torch.tensor(sub_ids, device=device))
        logits[index] -= torch.tensor(sub_values, device=device, dtype=logits.dtype)
    return logits


def _apply_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set to -inf every logit outside its row's top-k and outside the smallest top-p nucleus."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.tensor([kk if kk > 0 else vocab for kk in top_k], device=logits.device)
    drop = ranks >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    # a token stays if the mass strictly before it is below p: the most likely token always stays
    mass_before = probs.cumsum(dim=-1) - probs
    p = torch.tensor(top_p, device=logits.device)
    drop = mass_before >= p[:, None]
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
