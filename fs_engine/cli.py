"""``fs-engine`` command line.

Engine flags come from ``fs_engine.engine_args``: every engine argument of ``LLM(**kwargs)`` is also a flag,
with the same name in kebab case, and no other.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from fs_engine.engine.limits import HELP as LIMITS_HELP
from fs_engine.engine.limits import ClientLimits
from fs_engine.engine_args import add_engine_args, engine_kwargs
from ipc.errors import EngineDeadError

DEMO_PROMPTS = (
    "Hello! Who are you?",
    "Write a haiku about block groups.",
    "Explain preemption in one sentence.",
    "def fibonacci(n):",
)


def cmd_generate(args: argparse.Namespace) -> int:
    from fs_engine import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model, **engine_kwargs(args))
    load_s = time.perf_counter() - t0
    prompts = args.prompt or list(DEMO_PROMPTS)
    if args.chat and llm.tokenizer is not None:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                     add_generation_prompt=True) for p in prompts]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed_sampling)
    engine = llm.engine
    t1 = engine.clock.now()  # wall time, or a simulated device's virtual time
    outputs = llm.generate(prompts, params)
    gen_s = engine.clock.now() - t1
    print(f"model: {engine.config.model.model} ({engine.arch.architecture}, {engine.executor.device}, "
          f"{engine.executor.layout.dtype}), loaded in {load_s:.2f} s")
    for out in outputs:
        print("-" * 80)
        print(f"prompt: {out.prompt!r}")
        print(f"output: {out.text!r}")
        print(f"        {len(out.token_ids)} tokens, finish_reason={out.finish_reason}")
    num_tokens = sum(len(o.token_ids) for o in outputs)
    print("-" * 80)
    simulated = "simulated " if engine.clock.virtual else ""
    print(f"{len(outputs)} requests, {num_tokens} tokens in {gen_s:.2f} {simulated}s: "
          f"{num_tokens / gen_s:.1f} tokens/s ({engine.stats()['num_steps']} steps)")
    return 0


def _launch_config(args: argparse.Namespace, count_gpus: bool):
    """(config, model arch, max_model_len) of a launch, checked for its sharding without starting anything;
    ``count_gpus``: this machine must have a GPU for each of its ranks (else only the shapes must shard)."""
    from fs_engine.config import EngineConfig
    from fs_engine.engine.llm_engine import check_tensor_parallel, resolve_max_model_len, resolve_model_path
    from fs_engine.model_config import load_model_arch

    model = resolve_model_path(args.model)
    config = EngineConfig.from_kwargs(model=model, **engine_kwargs(args))
    arch = load_model_arch(model)
    tp = config.parallel.tensor_parallel_size
    if tp > 1:
        device = config.device.device if count_gpus else "cpu"
        check_tensor_parallel(arch, tp, device, config.parallel.ranks_per_node)
    return config, arch, resolve_max_model_len(config, arch)


def cmd_dry_run(args: argparse.Namespace) -> int:
    """``launch --dry-run GPU``: the per-rank memory plan of this launch on that GPU; nothing starts."""
    from fs_engine.engine.memory_plan import memory_plan

    config, arch, max_model_len = _launch_config(args, count_gpus=False)  # the plan's GPUs, not this machine's
    tp = config.parallel.tensor_parallel_size
    plan = memory_plan(config, arch, max_model_len, args.dry_run)
    print(f"dry run: {arch.architecture} from {config.model.model}, tensor_parallel_size={tp}, "
          f"max_model_len={max_model_len}, block_size={config.cache.block_size}, "
          f"gpu_memory_utilization={config.cache.gpu_memory_utilization}")
    print("\n".join(plan.lines()))
    print(f"engine: {plan.kv_tokens} KV tokens resident on the GPUs, {plan.host_blocks * plan.block_size} in host "
          f"memory; {tp} worker processes + 1 swap process would start")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    """``launch --nnodes M --node-rank K`` (K > 0): this machine's ranks of an engine whose frontend is node 0."""
    from fs_engine.engine.node import serve_node

    return serve_node(*_launch_config(args, count_gpus=True))


def _launch_keys(args: argparse.Namespace):
    """(keys, the server's CURVE keys, engine kwargs) of a launch: with a keys file its tenants' weights are the
    fair-share weights (a tenant also given in --tenant-weights must agree)."""
    kwargs = engine_kwargs(args)
    if args.keys is None:
        if args.server_key is not None:
            raise ValueError("--server-key without --keys: give the keys file of the clients to admit")
        return None, None, kwargs
    if args.server_key is None:
        raise ValueError("--keys needs the server's own key pair: --server-key server.key_secret "
                         "(make one with `fs-engine keys DIR server`)")
    from fs_engine.engine.auth import Keys
    from ipc.channels import CurveKeys

    keys = Keys.load(args.keys)
    server_key = CurveKeys.load(args.server_key)
    kwargs["tenant_weights"] = keys.merged_weights(kwargs.get("tenant_weights"))
    return keys, server_key, kwargs


def cmd_serve(args: argparse.Namespace) -> int:
    """The engine (``fs-engine launch`` on a private ipc:// socket, only this user can reach it) in a child
    process, and the HTTP API in this one."""
    from fs_engine.http.serve import serve

    return serve(args, _launch_argv(args))


def _launch_argv(args: argparse.Namespace) -> list[str]:
    """``fs-engine launch`` arguments for a serve's engine: its model, limits and engine arguments."""
    argv = ["--model", args.model_dir] if args.model_dir else []
    for f in dataclasses.fields(ClientLimits):
        argv += ["--" + f.name.replace("_", "-"), str(getattr(args, f.name))]
    for name, value in engine_kwargs(args).items():
        argv += ["--" + name.replace("_", "-"), ",".join(f"{t}={w:g}" for t, w in value.items())
                 if isinstance(value, dict) else str(value)]
    return argv


def cmd_keys(args: argparse.Namespace) -> int:
    from fs_engine.engine.auth import make_certificates

    for public, secret in make_certificates(args.directory, args.names):
        print(f"{public}  (public: list it in the keys file, or give it to clients as the server's key)")
        print(f"{secret}  (secret: keep it; --server-key, or CurveKeys.load on the client)")
    return 0


def cmd_launch(args: argparse.Namespace) -> int:
    import os

    from fs_engine.engine.llm_engine import LLMEngine
    from fs_engine.engine.server import FrontendServer

    if args.dry_run:
        return cmd_dry_run(args)
    if engine_kwargs(args).get("node_rank", 0) > 0:
        return cmd_node(args)

    import zmq

    limits = ClientLimits(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ClientLimits)})
    keys, server_key, kwargs = _launch_keys(args)
    engine = LLMEngine(args.model, multiprocess=True, **kwargs)
    address = args.address or f"tcp://{args.host}:{args.port}"
    try:
        server = FrontendServer(engine, address, limits, keys=keys, server_key=server_key)
    except zmq.ZMQError as e:  # the port is taken (or the host is not this machine's): nothing stays behind
        engine.shutdown()
        raise ValueError(f"cannot listen on {address}: {e.strerror}; choose another --port (0: any free one)") from e
    server.install_signal_handlers()
    print(f"fs-engine ready at {server.address} (model {engine.config.model.model}, {engine.arch.architecture}, "
          f"device {engine.executor.device}, {engine.executor.forward}, {engine.kv.num_blocks} KV blocks, "
          f"frontend pid {os.getpid()}, "
          f"run dir {engine.executor.run_dir})",
          flush=True)
    return server.serve()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fs-engine", description="fairness-aware LLM serving engine", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate completions offline and print them with timing", allow_abbrev=False)
    gen.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    gen.add_argument("--prompt", action="append", help="a prompt (repeatable; default: a few demo prompts)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed-sampling", type=int, default=None, help="per-request sampling seed")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    add_engine_args(gen)
    gen.set_defaults(func=cmd_generate)

    launch = sub.add_parser("launch", allow_abbrev=False,
                            help="serve clients over ZeroMQ: frontend, worker and swap processes")
    launch.add_argument("--model", default=None, help="checkpoint directory (default: the embedded tiny model)")
    launch.add_argument("--host", default="127.0.0.1", help="address to listen on")
    launch.add_argument("--port", type=int, default=5555, help="port to listen on (0: any free port)")
    launch.add_argument("--address", default=None, help="a ZeroMQ address to listen on instead of --host and "
                                                        "--port, e.g. ipc:///run/fs-engine/engine")
    for f in dataclasses.fields(ClientLimits):
        launch.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default,
                            help=f"{LIMITS_HELP[f.name]} (default: %(default)s)")
    launch.add_argument("--keys", metavar="FILE", default=None,
                        help="keys file binding client CURVE keys to tenants and weights (fs_engine/engine/auth.py "
                             "has the format): only listed clients connect, each as its key's tenant; needs "
                             "--server-key. Without it anyone who reaches the port may claim any tenant")
    launch.add_argument("--server-key", metavar="FILE", default=None,
                        help="the server's CURVE certificate (NAME.key_secret from `fs-engine keys`)")
    launch.add_argument("--dry-run", metavar="GPU", choices=("a100", "h100", "h200"), default=None,
                        help="print the per-rank memory plan on GPUs of this kind (80/80/141 GB) and exit: "
                             "weights, activations, KV and host arenas, context-switch bytes and time")
    add_engine_args(launch)
    launch.set_defaults(func=cmd_launch)

    serve = sub.add_parser("serve", allow_abbrev=False,
                           help="the OpenAI-compatible HTTP API, in front of an engine it launches")
    serve.add_argument("model_dir", nargs="?", default=None, metavar="MODEL",
                       help="checkpoint directory (default: the embedded tiny model)")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port")
    serve.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the "
                                                                 "directory's name)")
    serve.add_argument("--api-keys", metavar="FILE", default=None,
                       help="keys file (fs_engine/engine/auth.py): each tenant's api_keys and weight; requests "
                            "then need Authorization: Bearer KEY and run as its tenant")
    for f in dataclasses.fields(ClientLimits):
        serve.add_argument("--" + f.name.replace("_", "-"), type=int, default=f.default,
                           help=f"{LIMITS_HELP[f.name]} (default: %(default)s)")
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", allow_abbrev=False,
                          help="make CURVE key pairs (NAME.key, NAME.key_secret) for --keys and --server-key")
    keys.add_argument("directory", help="where to write them")
    keys.add_argument("names", nargs="+", help="one pair per name, e.g. server alice bob")
    keys.set_defaults(func=cmd_keys)

    # listed for --help; main() hands everything after "bench" to fs_engine.bench.cli
    sub.add_parser("bench", add_help=False, help="serving benchmark: generate, run, ablate (fs-engine bench --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from fs_engine.bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # user mistakes: one clear line, no traceback
        print(f"fs-engine: error: {e}", file=sys.stderr)
        return 2
    except EngineDeadError as e:  # a child failed at start-up: what failed and its last line (the cause)
        lines = [line for line in str(e).splitlines() if line.strip()]
        cause = f": {lines[-1].strip()}" if len(lines) > 1 else ""
        print(f"fs-engine: error: {lines[0] if lines else e}{cause}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
