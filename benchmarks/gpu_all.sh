#!/usr/bin/env bash
# Every performance figure in README.md, on a CUDA machine.
#   bash benchmarks/gpu_all.sh [OUT_DIR] [all|kernels|models|decode]
# Writes one log and JSON per benchmark into OUT_DIR (default ./bench-out) and prints a summary last.
# The sections split the ~20 minutes into parts that fit a time-limited job.
set -uo pipefail
out=${1:-${OUT:-bench-out}}
part=${2:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
# Fused chains and whole models run in the default configuration (untuned tiles, as `fxopt.optimize` gives a
# user); the attention suite and generation time tuned tiles (FXOPT_AUTOTUNE=1, results cached by Triton).
tuned=${FXOPT_AUTOTUNE:-1}
fresh_caches() {  # empty compiler caches, so first-call and optimize wall times include every compile
  local d; d=$(mktemp -d)
  export TRITON_CACHE_DIR=$d/triton TORCHINDUCTOR_CACHE_DIR=$d/inductor FXOPT_DUMP_DIR=$d/fxopt
}
run() {  # run NAME SECONDS CMD...: a benchmark with its own time limit, logged to $out/NAME.log
  local name=$1 limit=$2; shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warnings.warn|F.scaled_dot" > "$out/$name.log"
  tail -n 14 "$out/$name.log"
}
if [[ $part == all || $part == kernels ]]; then
  run fused 120 env FXOPT_AUTOTUNE=0 fxopt bench --suite fused --json "$out/fused.json"
  run attention 240 env FXOPT_AUTOTUNE="$tuned" fxopt bench --suite attention --json "$out/attention.json"
  run prefill_tiles_d128 180 python benchmarks/prefill_tiles.py --d 128
  run prefill_tiles_d64 180 python benchmarks/prefill_tiles.py --d 64
  run decode_variants 200 python benchmarks/decode_variants.py
fi
if [[ $part == all || $part == models ]]; then
  for model in gpt2-medium llama-1b-like; do  # one process per model, fresh caches: optimize wall time
    fresh_caches
    run "${model}_sdpa" 120 env FXOPT_AUTOTUNE=0 fxopt bench "$model" --attn-impl sdpa --batch 8 --seq 1024 \
        --dtype bf16 --no-regions --json "$out/${model}_sdpa.json"
    run "${model}_explicit_fuse_only" 120 env FXOPT_AUTOTUNE=0 fxopt bench "$model" --attn-impl explicit \
        --no-attention --batch 8 --seq 1024 --dtype bf16 --no-regions --json "$out/${model}_explicit.json"
  done
fi
unset TRITON_CACHE_DIR TORCHINDUCTOR_CACHE_DIR FXOPT_DUMP_DIR
if [[ $part == all || $part == decode ]]; then
  run decode 420 env FXOPT_AUTOTUNE="$tuned" fxopt bench llama-1b-like --decode \
      --configs "${DECODE_CONFIGS:-1x512x256,8x512x256,1x8192x256}" --json "$out/decode.json"
fi
echo "== summary"
grep -h -E "whole forward|^(E=|RMSNorm|LayerNorm|softmax|SwiGLU|GELU)|TFLOP/s|GB/s vs|PDL off|x512\+|x8192\+" \
    "$out"/*.log
