"""Per-step overhead of the multi-process engine against the in-process one, side by side.

The same requests (random prompts, greedy, exactly ``--max-tokens`` new tokens each) run through
``LLMEngine(multiprocess=False)`` (model in this process), ``LLMEngine(multiprocess=True)`` (a worker
process and a swap process over ZeroMQ, with async scheduling: the next plan waits in the worker's socket
while a step computes) and the same with ``async_scheduling=False`` (``mp-sync-sched``: each plan made once
the previous result is back), interleaved over ``--repeats`` rounds, at each batch size in ``--batches``. Printed: milliseconds per step, tokens/s and their ratio; the difference in ms per step is what
the process boundary costs (plan and result messages, a context switch each way); ``idle``: the share of
the wall time the worker sat waiting for its next plan (``stats()["worker_idle_s"]``). With ``--served`` the same
requests also go through ``fs-engine launch`` and the client SDK (one client, every request streaming), which
adds the client hop and per-token events.

    python tools/bench_multiprocess.py                          # tiny qwen3 (default preset), CPU
    python tools/bench_multiprocess.py --batches 1,8,32 --served --json out.json
"""

from __future__ import annotations

import argparse
import json
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from fs_engine import LLMEngine, SamplingParams  # noqa: E402
from fs_engine.tiny_model import make_tiny_model  # noqa: E402


def make_prompts(vocab_size: int, n: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab_size) for _ in range(length)] for _ in range(n)]


def run_engine(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, tag: str) -> dict:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    before = engine.stats()
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    outputs: dict[str, list[int]] = {}
    for ready in engine.run():  # output processing overlaps the next step, as in fs-engine launch
        outputs.update((o.request_id, o.token_ids) for o in ready if o.finished)
    seconds = time.perf_counter() - start
    after = engine.stats()
    return {"seconds": seconds, "steps": after["num_steps"] - before["num_steps"],
            "worker_idle_s": after["worker_idle_s"] - before["worker_idle_s"],
            "tokens": [outputs[f"{tag}-{i}"] for i in range(len(prompts))]}


class Served:
    """``fs-engine launch`` in a subprocess, driven through one ``Client``."""

    def __init__(self, model_dir: str, dtype: str) -> None:
        argv = [sys.executable, "-m", "fs_engine", "launch", "--model", model_dir, "--port", "0", "--dtype", dtype]
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        match = re.search(r"ready at (tcp://\S+)", line)
        if not match:
            self.proc.kill()
            raise RuntimeError(f"fs-engine launch did not start: {line!r}")
        from fs_engine.client import Client

        self.client = Client(match.group(1), timeout_s=120)

    def run(self, prompts: list[list[int]], max_tokens: int) -> dict:
        before = self.client.stats()
        start = time.perf_counter()
        streams = [self.client.generate(p, max_tokens=max_tokens, temperature=0, ignore_eos=True) for p in prompts]
        tokens = [[t for event in stream for t in event.token_ids] for stream in streams]
        seconds = time.perf_counter() - start
        after = self.client.stats()
        return {"seconds": seconds, "steps": after["num_steps"] - before["num_steps"],
                "worker_idle_s": after["worker_idle_s"] - before["worker_idle_s"], "tokens": tokens}

    def close(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


def summarize(runs: list[dict], num_tokens: int) -> dict:
    seconds = statistics.median(r["seconds"] for r in runs)
    steps = runs[0]["steps"]
    # the share of the wall time the worker sat waiting for its next plan (the frontend's work per step)
    idle = statistics.median(r["worker_idle_s"] / r["seconds"] for r in runs)
    return {"ms_per_step": round(1000 * seconds / steps, 3), "tokens_per_s": round(num_tokens / seconds, 1),
            "steps": steps, "worker_idle_fraction": round(idle, 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a freshly made tiny model)")
    ap.add_argument("--arch", default="qwen3", choices=("llama", "qwen2", "qwen3"))
    ap.add_argument("--preset", default="default", choices=("test", "default"))
    ap.add_argument("--batches", default="1,16", help="comma-separated numbers of concurrent requests")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--served", action="store_true", help="also run through fs-engine launch and the client SDK")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(make_tiny_model(args.arch, Path(tmp) / "model", preset=args.preset))
        engines = {"in-process": LLMEngine(model_dir, dtype=args.dtype),
                   "multi-process": LLMEngine(model_dir, dtype=args.dtype, multiprocess=True),
                   # the same without async scheduling: each plan made only once the previous result is back
                   "mp-sync-sched": LLMEngine(model_dir, dtype=args.dtype, multiprocess=True,
                                              async_scheduling=False)}
        served = Served(model_dir, args.dtype) if args.served else None
        try:
            vocab = engines["in-process"].arch.vocab_size
            warm = make_prompts(vocab, 2, 8, args.seed + 1)
            for name, engine in engines.items():  # first-call allocations, on both sides
                run_engine(engine, warm, 4, f"warm-{name}")
            if served:
                served.run(warm, 4)
            rows = []
            for batch in batches:
                prompts = make_prompts(vocab, batch, args.prompt_len, args.seed + batch)
                runs: dict[str, list[dict]] = {name: [] for name in engines}
                if served:
                    runs["served"] = []
                for r in range(args.repeats):  # interleaved, so drifting machine load hits every mode alike
                    for name, engine in engines.items():
                        runs[name].append(run_engine(engine, prompts, args.max_tokens, f"b{batch}-r{r}"))
                    if served:
                        runs["served"].append(served.run(prompts, args.max_tokens))
                num_tokens = batch * args.max_tokens
                row = {"batch": batch, **{name: summarize(rs, num_tokens) for name, rs in runs.items()}}
                reference = runs["in-process"][0]["tokens"]
                row["identical_outputs"] = all(r["tokens"] == reference for rs in runs.values() for r in rs)
                base, mp = row["in-process"], row["multi-process"]
                row["overhead_ms_per_step"] = round(mp["ms_per_step"] - base["ms_per_step"], 3)
                row["tokens_per_s_ratio"] = round(mp["tokens_per_s"] / base["tokens_per_s"], 3)
                row["sync_sched_tokens_per_s_ratio"] = round(row["mp-sync-sched"]["tokens_per_s"] / base["tokens_per_s"], 3)
                if served:
                    row["served_tokens_per_s_ratio"] = round(row["served"]["tokens_per_s"] / base["tokens_per_s"], 3)
                rows.append(row)
        finally:
            for engine in engines.values():
                engine.shutdown()
            if served:
                served.close()

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
    result = {"model": args.model or f"tiny-{args.arch}-{args.preset}", "device": device, "dtype": args.dtype,
              "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "repeats": args.repeats, "rows": rows}
    print(f"{result['model']} on {device}, {args.dtype}: prompts of {args.prompt_len} tokens, {args.max_tokens} new "
          f"tokens each, median of {args.repeats}")
    modes = [m for m in ("in-process", "multi-process", "mp-sync-sched", "served") if m in rows[0]]
    print(f"  {'batch':>5}  " + "  ".join(f"{m + ' ms/step':>22} {'tok/s':>8} {'idle':>5}" for m in modes)
          + f"  {'overhead':>9}  {'mp/in':>6}  {'mp-sync/in':>10}" + ("  served/in" if served else "") + "  identical")
    for row in rows:
        cells = "  ".join(f"{row[m]['ms_per_step']:22.2f} {row[m]['tokens_per_s']:8.1f} "
                          f"{row[m]['worker_idle_fraction']:5.0%}" for m in modes)
        line = (f"  {row['batch']:5d}  {cells}  {row['overhead_ms_per_step']:8.2f}ms  {row['tokens_per_s_ratio']:5.2f}x"
                f"  {row['sync_sched_tokens_per_s_ratio']:9.2f}x")
        if served:
            line += f"  {row['served_tokens_per_s_ratio']:8.2f}x"
        print(line + f"  {row['identical_outputs']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
