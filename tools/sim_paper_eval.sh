#!/usr/bin/env bash
# The FastSwitch evaluation at the paper's scale, on simulated devices (fs-engine bench ablate --simulate):
# Llama-3-8B shapes on an A10 24 GB and Qwen2.5-32B shapes on an A100 80 GB, 60 GB of host memory,
# 1,000 multi-turn ShareGPT V3 conversations (pip install fs-engine[sharegpt]), Poisson arrivals at 1
# conversation/s and at 2/s, priorities changing by the Random and the Markov pattern. FastSwitch's priority
# update frequencies (0.04 for 8B, 0.02 for 32B) are read as one update per 1/f engine iterations and turned
# into seconds with the simulated decode step time (about 50 ms on both): every 1.25 s and every 2.75 s.
#
#   bash tools/sim_paper_eval.sh [OUT_ROOT] [RUN ...]     # default OUT_ROOT=bench_results/sim, every run
#
# Each run writes OUT_ROOT/<run>/{trace.json,results.json,table.md,*.png,steps-*.csv}; a run whose
# results.json exists is skipped. About 5-6 minutes a run on one core of the 2-core development machine.
set -euo pipefail
cd "$(dirname "$0")/.."
out_root="${1:-bench_results/sim}"
shift || true
py="${PYTHON:-.venv/bin/python}"
shapes="$out_root/shapes"
mkdir -p "$shapes"
"$py" tools/make_shapes_config.py --shape llama3-8b --out "$shapes/llama3-8b" >/dev/null
"$py" tools/make_shapes_config.py --shape qwen2.5-32b --out "$shapes/qwen2.5-32b" >/dev/null

#        run name             device model        rate pattern interval
RUNS=("a10-8b-random        a10    llama3-8b    1 random 1.25"
      "a10-8b-markov        a10    llama3-8b    1 markov 1.25"
      "a10-8b-random-2x     a10    llama3-8b    2 random 1.25"
      "a100-32b-random      a100   qwen2.5-32b  1 random 2.75"
      "a100-32b-markov      a100   qwen2.5-32b  1 markov 2.75"
      "a100-32b-random-2x   a100   qwen2.5-32b  2 random 2.75")
for spec in "${RUNS[@]}"; do
  read -r name device model rate pattern interval <<<"$spec"
  if [ $# -gt 0 ] && [[ " $* " != *" $name "* ]]; then continue; fi
  out="$out_root/$name"
  if [ -f "$out/results.json" ]; then echo "[sim] $name: done already ($out)"; continue; fi
  echo "[sim] $name: $model on a simulated $device, $rate conversation/s, $pattern priorities every $interval s"
  "$py" -m fs_engine bench ablate --simulate "$device" --model "$shapes/$model" --sharegpt auto \
    --num-conversations 1000 --request-rate "$rate" --max-context 8192 --max-model-len 8192 \
    --priority-pattern "$pattern" --priority-interval-s "$interval" --cpu-kv-gb 60 \
    --step-log --no-progress --out "$out"
done
