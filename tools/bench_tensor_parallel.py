"""Per-step cost of tensor parallelism: the multi-process engine at ``tensor_parallel_size`` 1 against 2 (and
more), side by side on the same requests.

Every size runs the same requests (random prompts, greedy, exactly ``--max-tokens`` new tokens each) through
``LLMEngine(multiprocess=True, tensor_parallel_size=N)``, interleaved over ``--repeats`` rounds. Printed per
batch size: milliseconds per step, tokens/s, their ratio to one rank, and whether every size gave the same
tokens. On a CPU the ranks share the machine's cores (``--threads`` torch threads each) and talk over gloo, so
the figure is the cost of sharding (two all-reduces per layer, the plan sent to every rank), not a speed-up;
on GPUs each rank has its own device.

    python tools/bench_tensor_parallel.py                         # tiny qwen3 (test preset), TP 1 vs 2
    python tools/bench_tensor_parallel.py --sizes 1,2,4 --batches 1,16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS.parent))
sys.path.insert(0, str(TOOLS))

from bench_multiprocess import make_prompts, run_engine  # noqa: E402

from fs_engine import LLMEngine  # noqa: E402
from fs_engine.tiny_model import make_tiny_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint directory (default: a freshly made tiny model)")
    ap.add_argument("--arch", default="qwen3", choices=("llama", "qwen2", "qwen3"))
    ap.add_argument("--preset", default="test", choices=("test", "default"))
    ap.add_argument("--sizes", default="1,2", help="comma-separated tensor_parallel_size values")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--json", help="write the results to this file")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(make_tiny_model(args.arch, Path(tmp) / "model", preset=args.preset))
        previous = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the ranks are spawned: they read it at start-up
        try:
            engines = {n: LLMEngine(model_dir, multiprocess=True, tensor_parallel_size=n) for n in sizes}
        finally:
            if previous is None:
                os.environ.pop("OMP_NUM_THREADS")
            else:
                os.environ["OMP_NUM_THREADS"] = previous
        try:
            vocab = engines[sizes[0]].arch.vocab_size
            for n, engine in engines.items():
                run_engine(engine, make_prompts(vocab, 2, 8, 1), 4, f"warm-{n}")
            for batch in batches:
                prompts = make_prompts(vocab, batch, args.prompt_len, batch)
                runs = {n: [] for n in sizes}
                for r in range(args.repeats):  # interleaved, so drifting machine load hits every size alike
                    for n, engine in engines.items():
                        runs[n].append(run_engine(engine, prompts, args.max_tokens, f"b{batch}-r{r}"))
                row = {"batch": batch, "identical_outputs": all(
                    run["tokens"] == runs[sizes[0]][0]["tokens"] for rs in runs.values() for run in rs)}
                for n, rs in runs.items():
                    seconds = statistics.median(run["seconds"] for run in rs)
                    row[f"tp{n}"] = {"ms_per_step": round(1000 * seconds / rs[0]["steps"], 3),
                                     "tokens_per_s": round(batch * args.max_tokens / seconds, 1)}
                rows.append(row)
        finally:
            for engine in engines.values():
                engine.shutdown()

    print(f"{args.model or f'tiny-{args.arch}-{args.preset}'} on cpu, {args.threads} torch thread(s) per rank: "
          f"prompts of {args.prompt_len} tokens, {args.max_tokens} new tokens each, median of {args.repeats}")
    print(f"  {'batch':>5}  " + "  ".join(f"{'TP=' + str(n) + ' ms/step':>14} {'tok/s':>8} {'vs TP=' + str(sizes[0]):>8}"
                                         for n in sizes) + "  identical")
    for row in rows:
        base = row[f"tp{sizes[0]}"]["tokens_per_s"]
        cells = "  ".join(f"{row[f'tp{n}']['ms_per_step']:14.2f} {row[f'tp{n}']['tokens_per_s']:8.1f} "
                          f"{row[f'tp{n}']['tokens_per_s'] / base:7.2f}x" for n in sizes)
        print(f"  {row['batch']:5d}  {cells}  {row['identical_outputs']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
