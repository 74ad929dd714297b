#!/usr/bin/env bash
# The GPU evidence in one run of at most 8 minutes: a GPU is lent rarely, for about 15 minutes in all.
#
#   bash tools/gpu_checks.sh                     # on the GPU machine, from the repository root
#   bash tools/gpu_checks.sh --only decode,calibrate   # rerun some steps (names as in the summary)
#   bash tools/gpu_checks.sh --dry-run           # the CPU rehearsal: every step at CPU size (tests run it)
#   bash tools/gpu_checks.sh --wheels            # here, before the run: the wheels the GPU image lacks -> .whl/
#
# Through the device tool: run(command="bash tools/gpu_checks.sh", carry=[".whl"], timeout_s=540), then give the
# machine back; the figures go to docs/BENCHMARKS.md and the README with the device name, date and command.
#
# Steps, in order of value; each runs under its own `timeout` and the whole run under --budget (default 450 s):
# a step that fails or times out is reported and the next one runs; one with no time left is reported skipped.
#   kernels      the Triton and torch attention kernel tests, on CUDA
#   gpu-tests    every tests/gpu test: the engine on CUDA, CUDA graphs, compiled, flash-attn, tensor parallel
#   engine       token parity, swap/reuse, copy ordering, preemption and multi-process tests on CUDA (float32,
#                eager forward: CUDA IPC, pinned memory and copy streams meet here)
#   bandwidth    pinned host<->device copy bandwidth against copy size (the ceiling)
#   swap-copy    one request's swap-out + swap-in per copy granularity, Llama-3-8B KV, contiguous and scattered
#   overlap      decode step time with and without concurrent swaps, sync vs async (Llama-3-8B shapes, bf16)
#   decode       decode tokens/s: eager, CUDA graphs, transformers (Llama-3-8B shapes, bf16)
#   compiled     decode tokens/s: compile=on, without and with CUDA graphs, cold and warm start
#   calibrate    the simulated device's profile fitted on this GPU, and the real-vs-simulated replay
# Results go to ${OUT:-gpu-out}: summary.md (the table, also printed last), results.json (every step's figures),
# log.txt (every command's output), raw.tar.gz (the steps' own files), profile.json and validation.md
# (calibration): at most 8 files, none in a folder, as the device tool brings back.
set -uo pipefail

DRY=0
ONLY=""
BUDGET=450
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --only) ONLY="$2"; shift ;;
    --budget) BUDGET="$2"; shift ;;
    --wheels) WHEELS=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "gpu_checks.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

# Not in the GPU image (its python3 holds torch, triton, transformers, numpy, msgpack, pytest, hypothesis): the
# versions this checkout is tested with, for CPython 3.12 on x86-64.
WHEEL_SPECS="pyzmq==27.3.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
typing_extensions==4.16.0"
if [ "${WHEELS:-0}" = 1 ]; then
  for spec in $WHEEL_SPECS; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d .whl "$spec" || exit 1
  done
  ls .whl
  exit 0
fi

PY="${PYTHON:-python3}"
out="${OUT:-gpu-out}"
work="$(mktemp -d /tmp/gpu-checks.XXXXXX)"
mkdir -p "$out"
log="$out/log.txt"
steps="$work/steps.tsv"
: >"$log"
: >"$steps"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if [ "$DRY" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$log" 2>&1 && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" -c "
import importlib.util as u
print(' '.join(m for m in ('zmq', 'pydantic', 'msgpack', 'transformers', 'pytest') if u.find_spec(m) is None))")
[ -n "$missing" ] && echo "gpu_checks.sh: missing Python modules: $missing (carry .whl/, see --wheels)" | tee -a "$log"
{ echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
  nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; "$PY" -c "import torch; print('torch', torch.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"; } >"$work/device.txt" 2>&1
cat "$work/device.txt" >>"$log"

deadline=$((SECONDS + BUDGET))

step() {  # step NAME TIMEOUT_S COMMAND...: run it under its timeout and the run's deadline, one row in steps.tsv
  local name=$1 limit=$2 start=$SECONDS rc status left
  shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then
    return
  fi
  left=$((deadline - SECONDS))
  if [ "$left" -lt 15 ]; then
    printf '%s\tskipped (no time left)\t-\t0\t%s\n' "$name" "$limit" >>"$steps"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  printf '\n===== %s (timeout %ss): %s\n' "$name" "$limit" "$*" >>"$log"
  timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out" ;;
    *) status=failed ;;
  esac
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$((SECONDS - start))" "$limit" >>"$steps"
  collect  # after every step, so a run cut short still brings back what it has
}

collect() {
  "$PY" tools/gpu_checks_summary.py --work "$work" --out "$out" >/dev/null 2>>"$log"
}

l8b="$work/llama3-8b"
"$PY" tools/make_shapes_config.py --shape llama3-8b --out "$l8b" >>"$log" 2>&1
kernels=(tests/unit/test_triton_attention.py tests/unit/test_torch_attention.py)
engine=(tests/integration/test_hf_parity.py tests/integration/test_swap_reuse.py tests/integration/test_copy_ordering.py
        tests/integration/test_preemption.py tests/integration/test_multiprocess.py)

if [ "$DRY" = 1 ]; then  # every command of the GPU run, at CPU size: a typo fails here, not on the GPU
  collect_only=(--collect-only)
  swap_shape=(--tokens 64 --layers 2 --repeats 2)
  bandwidth=(--sizes 65536,1048576 --repeats 2)
  model8b=()
  overlap=(--batch 2 --ballast-tokens 64 --steps 8)
  decode=(--batches 1,2 --prompt-len 8 --new-tokens 4 --repeats 1)
  compiled_skip=transformers,compiled  # compile=on is tested by tests/integration/test_compiled_model.py;
                                       # here the command line, and compiled+graphs is GPU-only anyway
  calibrate=(--no-validate)
else
  collect_only=()
  swap_shape=(--tokens 1024,2048,4096,8192)
  bandwidth=()
  model8b=(--model "$l8b" --load-format dummy)
  overlap=(--engine-dtype bfloat16 --batch 16 --ballast-tokens 4096 --steps 60)
  decode=(--dtype bfloat16 --batches 1,8,32 --prompt-len 512 --new-tokens 64 --repeats 2)
  compiled_skip=transformers
  # compile off: a compilation for each engine the calibration builds would not fit (the profile is of the eager
  # forward under CUDA graphs)
  calibrate=(--dtype bfloat16 --device cuda --compile off)
fi

# pytest-xdist (in the GPU image): the kernel tests compile a Triton kernel per shape and dtype, on 8 processes at
# once; the engine tests share the GPU 4 ways, each engine's KV arena a fixed 2 GiB instead of a share of what is
# free (which a neighbour's arena would change). tests/gpu run alone: one of them sizes KV from free memory.
if "$PY" -c "import xdist" 2>/dev/null; then
  kernel_workers=(-n 8)
  engine_workers=(-n 4)
else
  kernel_workers=()
  engine_workers=()
fi
pytest=("$PY" -m pytest -q -rfEs -p no:cacheprovider "${collect_only[@]}")
step kernels 90 "${pytest[@]}" "${kernel_workers[@]}" --junitxml="$work/kernels.xml" "${kernels[@]}"
step gpu-tests 120 "${pytest[@]}" --junitxml="$work/gpu-tests.xml" tests/gpu
engine_device=$([ "$DRY" = 1 ] && echo cpu || echo cuda)
export FS_TEST_ENGINE_ARGS="device=$engine_device,dtype=float32,compile=off,kv_cache_memory_gb=2"
OMP_NUM_THREADS=4 step engine 100 "${pytest[@]}" "${engine_workers[@]}" --junitxml="$work/engine.xml" "${engine[@]}"
unset FS_TEST_ENGINE_ARGS
step bandwidth 25 "$PY" tools/bench_swap.py --scenario bandwidth "${bandwidth[@]}" --json "$work/bandwidth.json"
step swap-copy 40 bash -c '"$0" tools/bench_swap.py "${@:2}" --json "$1/swap_copy.json" &&
  "$0" tools/bench_swap.py "${@:2}" --placement scattered --json "$1/swap_copy_scattered.json"' \
  "$PY" "$work" "${swap_shape[@]}"
step overlap 50 "$PY" tools/bench_swap.py --scenario overlap "${model8b[@]}" "${overlap[@]}" --mode sync,async \
  --json "$work/overlap.json"
step decode 90 "$PY" tools/bench_decode.py "${model8b[@]}" "${decode[@]}" --skip compiled,compiled+graphs \
  --json "$work/decode.json"
step compiled 110 "$PY" tools/bench_decode.py "${model8b[@]}" "${decode[@]}" --skip "$compiled_skip" \
  --json "$work/decode_compiled.json"
step calibrate 90 "$PY" -m fs_engine bench calibrate --out "$work/calibrate" --quick --no-progress \
  $([ "$DRY" = 1 ] || echo --model "$l8b" --load-format dummy) "${calibrate[@]}"

collect
"$PY" tools/gpu_checks_summary.py --work "$work" --out "$out" --print
status=$?
rm -rf "$work"
exit $status
