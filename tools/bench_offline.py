"""Offline throughput: fs-engine ``LLM.generate`` against transformers ``generate``, side by side.

Both run the same prompts (random token ids of mixed lengths) on the same checkpoint, greedy, exactly
``--max-tokens`` new tokens each (eos ignored on both sides), interleaved over ``--repeats`` rounds; the
medians and their ratio are printed. transformers gets its best offline mode: one padded batch.

    python tools/bench_offline.py                        # tiny qwen3 (default preset), CPU
    python tools/bench_offline.py --model DIR --num-prompts 64 --max-tokens 128 --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fs_engine import LLM, SamplingParams  # noqa: E402
from fs_engine.tiny_model import make_tiny_model  # noqa: E402


def make_prompts(vocab_size: int, n: int, min_len: int, max_len: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def run_engine(llm: LLM, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    return time.perf_counter() - start, [o.token_ids for o in outs]


def run_hf(model, prompts: list[list[int]], max_tokens: int, device: str) -> tuple[float, list[list[int]]]:
    width = max(len(p) for p in prompts)
    # left padding, so every row's last prompt token sits in the last column
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out[:, width:].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a freshly made tiny model)")
    ap.add_argument("--arch", default="qwen3", choices=("llama", "qwen2", "qwen3"))
    ap.add_argument("--preset", default="default", choices=("test", "default"))
    ap.add_argument("--num-prompts", type=int, default=16)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(make_tiny_model(args.arch, Path(tmp) / "model", preset=args.preset))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        llm = LLM(model_dir, dtype=args.dtype)
        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).to(device).eval()
        prompts = make_prompts(llm.engine.arch.vocab_size, args.num_prompts, args.min_len, args.max_len, args.seed)
        run_engine(llm, prompts[:2], 4)  # warm-up: first-call allocations and kernel selection
        run_hf(hf, prompts[:2], 4, device)
        engine_s, hf_s = [], []
        for _ in range(args.repeats):  # interleaved, so drifting machine load hits both alike
            t, engine_tokens = run_engine(llm, prompts, args.max_tokens)
            engine_s.append(t)
            t, hf_tokens = run_hf(hf, prompts, args.max_tokens, device)
            hf_s.append(t)

    num_tokens = args.num_prompts * args.max_tokens
    engine_tps = num_tokens / statistics.median(engine_s)
    hf_tps = num_tokens / statistics.median(hf_s)
    same = sum(a == b for a, b in zip(engine_tokens, hf_tokens))
    result = {
        "model": args.model or f"tiny-{args.arch}-{args.preset}",
        "device": torch.cuda.get_device_name() if device == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": args.dtype,
        "num_prompts": args.num_prompts,
        "prompt_len": [args.min_len, args.max_len],
        "max_tokens": args.max_tokens,
        "fs_engine_tokens_per_s": round(engine_tps, 1),
        "transformers_tokens_per_s": round(hf_tps, 1),
        "ratio": round(engine_tps / hf_tps, 2),
        "identical_outputs": f"{same}/{args.num_prompts}",
    }
    print(f"{result['model']} on {result['device']}, {args.dtype}: {args.num_prompts} prompts of "
          f"{args.min_len}-{args.max_len} tokens, {args.max_tokens} new tokens each, median of {args.repeats}")
    print(f"  fs-engine LLM.generate      {engine_tps:9.1f} tokens/s")
    print(f"  transformers generate       {hf_tps:9.1f} tokens/s  (one left-padded batch)")
    print(f"  ratio                       {result['ratio']:9.2f}x")
    print(f"  greedy outputs identical    {result['identical_outputs']} (padding can shift float rounding in HF)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
