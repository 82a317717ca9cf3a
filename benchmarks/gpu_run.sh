#!/usr/bin/env bash
# One GPU-machine session: install offline, run the GPU tests, then the named benchmarks.
# Usage (from the project root, on the GPU machine, with .whl carried):
#   bash benchmarks/gpu_run.sh tests decode
# phases: tests, enginetests, kernels, decode, profile, overhead, serving, async (batch-1 decode with
# and without asynchronous scheduling), prefix (a closed loop with and without a shared prompt prefix),
# fp8 (batch-1 decode and the offline run with FP8 weights), kvfp8 (the same with an FP8 KV cache,
# with bf16 and with FP8 weights, and the latter at a 2048-token budget)
# Results and logs land in $OUT (or benchmarks/results when OUT is unset). The serving phase takes
# SERVING_LIMIT_S / SERVING_TIMEOUT_S (the kernels phase takes KERNELS_ARGS, e.g. "--only moe")
# and extra arguments in SERVING_ARGS, e.g. to finish a sweep:
#   SERVING_ARGS="--workloads 512-512 --offline-requests 0 --skip-peer" bash benchmarks/gpu_run.sh serving
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
OUT=${OUT:-benchmarks/results}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  && export PYTHONPATH=/tmp/site || exit 1
# fastgen itself, offline, with the image's setuptools (pyproject maps kernels/fastgen_kernels to fastgen.kernels)
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
for phase in "$@"; do
  echo "=== $phase ($(date -u +%H:%M:%S))"
  case "$phase" in
    tests)   timeout 420 python3 -m pytest -m gpu -q tests/kernels tests/test_gpu_engine.py tests/test_fp8.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -25 ;;
    kernels) timeout 300 python3 benchmarks/kernel_timings.py --out "$OUT" ${KERNELS_ARGS:-} 2>&1 | tee "$OUT/kernels.log" | tail -40 ;;
    decode)  timeout 300 python3 benchmarks/decode_step.py --out "$OUT" 2>&1 | tee "$OUT/decode.log" | tail -20 ;;
    profile) timeout 400 python3 -m benchmarks.step_profile --out "$OUT/step_profile.json" 2>&1 | tee "$OUT/step_profile.log" | tail -80 ;;
    overhead) timeout 300 python3 -m benchmarks.host_overhead 2>&1 | tee "$OUT/overhead.log" | tail -70 ;;
    enginetests) timeout 300 python3 -m pytest -m gpu -q tests/test_gpu_engine.py 2>&1 | tee "$OUT/engine_tests.log" | tail -25 ;;
    serving) timeout "${SERVING_TIMEOUT_S:-560}" python3 benchmarks/serving.py --model-shape llama2-7b \
               --time-limit-s "${SERVING_LIMIT_S:-420}" --max-run-s 120 --peer-requests 64 --peer-time-limit-s 110 \
               --out "$OUT" ${SERVING_ARGS:-} 2>&1 | tee "$OUT/serving.log" | tail -45 \
             || python3 benchmarks/report.py "$OUT"/serving-*.json | tail -30 ;;
    async) for flag in "" "--no-async-scheduling"; do
             echo "--- batch-1 ${flag:-with asynchronous scheduling}"
             timeout 280 python3 benchmarks/serving.py --model-shape llama2-7b --workloads 1200-128 --clients "" \
               --offline-requests 0 --skip-peer --time-limit-s 200 --out "$OUT" $flag 2>&1 \
               | tee -a "$OUT/async.log" | grep -iE "batch-1|decode tok" | tail -4
           done ;;
    prefix) timeout 400 python3 benchmarks/serving.py --model-shape llama2-7b --workloads 1200-128 --clients "" \
              --offline-requests 0 --skip-peer --batch1-repeats 0 --shared-prefix 1024,200,128 \
              --time-limit-s 330 --out "$OUT" 2>&1 | tee "$OUT/prefix.log" | grep -E "prefix|TTFT" | tail -8 ;;
    fp8) timeout 400 python3 benchmarks/serving.py --model-shape llama2-7b --workloads 1200-128 --clients "" \
           --offline-requests 512 --skip-peer --time-limit-s 330 --quantization fp8 --out "$OUT" 2>&1 \
           | tee "$OUT/fp8.log" | tail -25 ;;
    kvfp8) for extra in "" "--quantization fp8" "--quantization fp8 --token-budget 2048"; do
             echo "--- FP8 KV cache ${extra:+and FP8 weights}"
             timeout 280 python3 benchmarks/serving.py --model-shape llama2-7b --workloads 1200-128 --clients "" \
               --offline-requests 512 --skip-peer --time-limit-s 200 --kv-cache-dtype fp8 $extra --out "$OUT" 2>&1 \
               | tee -a "$OUT/kvfp8.log" | grep -E "engine:|batch-1 decode tok|^\| fastgen|Roofline"
           done ;;
    *) echo "unknown phase $phase" ;;
  esac
done
