#!/usr/bin/env bash
# Everything a GPU session checks and measures, in few calls: the GPU is lent rarely and by the minute.
#
#   bash tools/gpu_session.sh checks   # kernel tests on CUDA, every `gpu` test                 (~5 min)
#   bash tools/gpu_session.sh bench    # copy bandwidth, swap latency per granularity, overlap,
#                                      # decode tokens/s (eager / compiled / graphs / compiled+graphs / transformers)  (~8 min)
#   bash tools/gpu_session.sh ablation # the FastSwitch ablation at Llama-3-8B shapes        (~8 min)
#
# Run from the repository root on the GPU machine (its python3 holds torch + Triton). pyzmq is not in that
# image: carry its wheel (`pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
# --platform manylinux_2_28_x86_64 -d .whl pyzmq`; `.whl/` is git-ignored) and this script installs it.
# Logs and results go to ${OUT:-gpu-out}, at most 8 files (what the device tool brings back); a summary
# table is printed last.
set -uo pipefail
what="${1:-checks}"
out="${OUT:-gpu-out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$out/$what.log"
summary="$out/summary.txt"
{ nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"; } >>"$summary" 2>&1

step() {  # step NAME COMMAND...: run it, append its output to the log, one summary line
  local name=$1 start=$SECONDS rc
  shift
  echo "===== $name: $*" >>"$log"
  "$@" >>"$log" 2>&1
  rc=$?
  printf '%-28s rc=%-3s %5ss\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$summary"
}

l8b=/tmp/llama3-8b
python3 tools/make_shapes_config.py --shape llama3-8b --out "$l8b" >/dev/null

case "$what" in
  checks)
    step kernel-tests python3 -m pytest -q -x tests/unit/test_triton_attention.py tests/unit/test_torch_attention.py
    step gpu-tests python3 -m pytest -q -rs tests/gpu
    step engine-tests python3 -m pytest -q -x tests/integration/test_hf_parity.py tests/integration/test_swap_reuse.py \
      tests/integration/test_multiprocess.py
    ;;
  bench)
    step bandwidth python3 tools/bench_swap.py --scenario bandwidth --json "$out/bandwidth.json"
    step swap-copy python3 tools/bench_swap.py --tokens 1024,2048,4096,8192 --json "$out/swap_copy.json"
    step swap-copy-scattered python3 tools/bench_swap.py --tokens 1024,4096,8192 --placement scattered \
      --json "$out/swap_copy_scattered.json"
    step overlap python3 tools/bench_swap.py --scenario overlap --model "$l8b" --load-format dummy --engine-dtype bfloat16 \
      --mode sync,async --batch 16 \
      --ballast-tokens 4096 --steps 60 --json "$out/overlap.json"
    step decode python3 tools/bench_decode.py --model "$l8b" --dtype bfloat16 --batches 1,8,32,64 --prompt-len 512 \
      --new-tokens 128 --json "$out/decode.json"
    ;;
  ablation)
    step ablation python3 -m fs_engine bench ablate --model "$l8b" --load-format dummy --dtype bfloat16 \
      --out "$out/ablation" --num-conversations 64 --request-rate 4 --tenants a=2,b=1 --priority-pattern markov \
      --priority-interval-s 0.5 --policy priority --num-gpu-blocks 3000 --slo-ttft 1.0 --slo-tbt 0.1 --no-progress
    ;;
  *)
    echo "usage: $0 checks|bench|ablation" >&2
    exit 2
    ;;
esac
echo "----- $what: summary"
cat "$summary"
tail -n 60 "$log"
