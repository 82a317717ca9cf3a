#!/usr/bin/env bash
# One GPU-machine session: install offline, run the GPU tests, then the named benchmarks.
# Usage (from the project root, on the GPU machine, with .whl carried):
#   bash benchmarks/gpu_run.sh tests decode
# phases: pdl (decode step with and without programmatic dependent launch), tests (needs the pytest-xdist and execnet wheels in .whl; GPU_TEST_PATHS picks files, GPU_TEST_TB the traceback style), enginetests, kernels, decode, gemv, sweep (attention launch parameters), profile, overhead, serving, async (batch-1 decode with
# and without asynchronous scheduling), prefix (a closed loop with and without a shared prompt prefix),
# b1profile (the batch-1 step's kernels, bf16 and FP8, both shapes; the FP8 step with each fusion off),
# qkvrows (the decode step at 2-8 rows: no fusion, qkv_rotary alone, rotary_kv alone; FUSIONS_ARGS as for fusions),
# fusions (issue 13: the decode step with each fused kernel turned off in turn;
# FUSIONS_ARGS, e.g. "--shape llama3-8b"), fp8 (batch-1 decode and the offline run with FP8 weights), kvfp8 (the same with an FP8 KV cache,
# with bf16 and with FP8 weights, and the latter at a 2048-token budget), ab (batch-1 decode and the offline
# run of the Llama-2-7B shape in this tree and then in AB_BASE_TREE, an older commit's tree; AB_ARGS, AB_LIMIT_S), families (batch-1 decode and
# the offline 256 x (1200, 128) run of the smallest real shape of Falcon, OPT and Qwen v1; FAMILY_SHAPES,
# FAMILY_TIMEOUT_S per shape), snapload (issue 18: start-up from the HF checkpoint vs its snapshot, cold and
# warm page cache, bf16 and FP8, Llama-2-7B shape with 8 of its 32 layers; SNAPLOAD_ARGS="--num-layers 32"
# for all of them, about 2.5x longer), readsweep (after snapload: its snapshot file read to the GPU by each
# reader variant, READ_VARIANTS)
# Results and logs land in $OUT (or benchmarks/results when OUT is unset). The serving phase takes
# SERVING_LIMIT_S / SERVING_TIMEOUT_S (the kernels phase takes KERNELS_ARGS, e.g. "--only moe")
# and extra arguments in SERVING_ARGS, e.g. to finish a sweep:
#   SERVING_ARGS="--workloads 512-512 --offline-requests 0 --skip-peer" bash benchmarks/gpu_run.sh serving
#
# Issue 13 (stalls, offline budget, stronger peers), in one call of ~9 minutes:
#   PACK=1 bash benchmarks/gpu_run.sh fibuild tests13 startup serving8b flashinfer
# - fibuild: starts building FlashInfer's JIT kernels in the background (nice 19, MAX_JOBS=8; needs the
#   flashinfer-python 0.6.14, apache-tvm-ffi, ninja and nvidia-ml-py wheels in .whl); the flashinfer
#   phase waits for it;
# - tests13: the GPU tests of GPU_TESTS (default: no compiles while serving, sampling kernels);
# - startup: engine start-up of the Llama-3-8B shape cold (new TRITON_CACHE_DIR) and warm; later
#   phases use that (now warm) cache;
# - serving8b: Llama-3-8B shape: HF generate batch-1 peers (eager and static cache + torch.compile),
#   batch-1 decode, the offline run of 512 x (1200, 128) at each of OFFLINE_BUDGETS (default
#   768,2048,4096; the last ones are skipped if SERVING8B_LIMIT_S runs out), closed loops of
#   (1200, 128) and (2600, 60) at 32 and 16 clients, with stall and kernel-compile checks;
# - flashinfer: fastgen's paged attention vs FlashInfer's, decode and prefill, both head layouts.
# Timeouts: TESTS13_TIMEOUT_S (120), STARTUP_TIMEOUT_S (150), SERVING8B_TIMEOUT_S (300, its own
# limit SERVING8B_LIMIT_S 270), FLASHINFER_TIMEOUT_S (150, build wait included); extra arguments:
# SERVING8B_ARGS, FLASHINFER_ARGS; FIBUILD_WAIT_S (90): how long flashinfer waits for the build.
# With PACK=1 each phase's files go into one $OUT/<phase>.tgz (few files come back from the GPU
# machine); its stdout tail stays in the log.
# A tree copied without its .git (the GPU machine's .git may be stale): put the commit in a COMMIT file,
#   rm -rf .snap && mkdir .snap && git archive HEAD | tar -x -C .snap && git rev-parse --short HEAD > .snap/COMMIT \
#     && rm -rf .snap/benchmarks/results/*   # 17 MB the run does not read: the working tree's limit is 64 MiB
# and run from .snap (carry .whl and .snap; the wheels are found at the root); the results then name
# that commit. The ab phase's base tree is a `git archive` of the older commit in .snap/old.
set -uo pipefail
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
if [ -f COMMIT ]; then export FASTGEN_COMMIT="$(cat COMMIT)"; fi
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
WHEELS=.whl; if [ ! -d "$WHEELS" ] && [ -d ../.whl ]; then WHEELS=../.whl; fi  # run from .snap: the root's
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$WHEELS"/*.whl \
  && export PYTHONPATH=/tmp/site PATH=/tmp/site/bin:$PATH || exit 1
# fastgen itself, offline, with the image's setuptools (pyproject maps kernels/fastgen_kernels to fastgen.kernels)
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export FLASHINFER_WORKSPACE_BASE=/tmp/fastgen-flashinfer
# Triton's compiled kernels from an earlier call (a fresh machine starts with an empty cache):
# .tcache/triton-cache.tgz, as SAVE_TRITON_CACHE=1 packs it into $OUT at the end
TRITON_HOME_CACHE=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
if [ -f .tcache/triton-cache.tgz ]; then
  mkdir -p "$TRITON_HOME_CACHE" && tar -xzf .tcache/triton-cache.tgz -C "$TRITON_HOME_CACHE" \
    && echo "Triton cache restored: $(ls "$TRITON_HOME_CACHE" | wc -l) kernels"
fi
STARTUP_CACHE=/tmp/fastgen-triton-startup
FIBUILD_PID=""
FIBUILD_LOG=""
for phase in "$@"; do
  echo "=== $phase ($(date -u +%H:%M:%S))"
  D="$OUT"  # where the phase writes; with PACK=1 a folder packed into $OUT/$phase.tgz after it
  if [ -n "${PACK:-}" ]; then D="$OUT/_work/$phase"; mkdir -p "$D"; fi
  case "$phase" in
    tests)   # GPU_TEST_WORKERS pytest-xdist processes share the GPU: Triton compiles on many cores at once.
             # In GPU_TEST_PATHS name tests/kernels files before top-level ones: listed after them, they
             # errored at setup with "fixture 'seed' not found" (pytest-xdist, session 14)
             # -v names every finished test in the log; SIGINT at the limit still prints the summary
             timeout -s INT "${TESTS_TIMEOUT_S:-500}" python3 -m pytest -m gpu -v -p no:cacheprovider \
               -n "${GPU_TEST_WORKERS:-8}" -o faulthandler_timeout=240 --durations=12 --tb="${GPU_TEST_TB:-short}" \
               ${GPU_TEST_PATHS:-tests/kernels tests/test_gpu_engine.py \
               tests/test_fp8.py tests/test_gpu_stalls.py tests/test_fusions.py tests/test_fused_linears.py \
               tests/test_snapshot.py tests/models/test_file_reader.py tests/test_batch.py} 2>&1 \
               | tee "$D/gpu_tests.log" | grep -vE "PASSED|^tests/.*::| warner|PytestBenchmarkWarning" | tail -40 ;;
    kernels) timeout 300 python3 benchmarks/kernel_timings.py --out "$D" ${KERNELS_ARGS:-} 2>&1 | tee "$D/kernels.log" | tail -40 ;;
    decode)  timeout 300 python3 benchmarks/decode_step.py --out "$D" 2>&1 | tee "$D/decode.log" | tail -20 ;;
    gemv)    # the decode matmuls, Triton against cuBLAS; GEMV_ARGS, e.g. "--variants --rows 1"
             timeout "${GEMV_TIMEOUT_S:-360}" python3 benchmarks/gemv.py --out "$D" ${GEMV_ARGS:-} 2>&1 \
               | tee "$D/gemv.log" | tail -40 ;;
    fusions) timeout "${FUSIONS_TIMEOUT_S:-300}" python3 benchmarks/decode_step.py --graphs on \
               --fusions-off "",qkv_rotary,qkv_rotary+rotary_kv,gated_down,norm_linear,all --out "$D" ${FUSIONS_ARGS:-} 2>&1 \
               | tee "$D/fusions.log" | tail -24 ;;
    pdl)     # the decode step with programmatic dependent launch on and off (FASTGEN_PDL), both shapes; PDL_ARGS
             for shape in ${PDL_SHAPES:-llama2-7b llama3-8b}; do
               timeout "${PDL_TIMEOUT_S:-170}" python3 benchmarks/decode_step.py --shape "$shape" --pdl 1,0 \
                 --batches 1 8 --context 384 --out "$D" ${PDL_ARGS:-} 2>&1 | tee -a "$D/pdl.log" | grep -E "^\|"
             done ;;
    sweep)   # attention launch parameters per shape; SWEEP_ARGS, e.g. "--launch chunk" or "--cache-dtype fp8"
             timeout "${SWEEP_TIMEOUT_S:-200}" python3 -m benchmarks.attention_launch_sweep --out "$D" ${SWEEP_ARGS:-} 2>&1 \
               | tee "$D/sweep.log" | tail -30 ;;
    profile) timeout "${PROFILE_TIMEOUT_S:-400}" python3 -m benchmarks.step_profile --out "$D/step_profile.json" ${PROFILE_ARGS:-} 2>&1 | tee "$D/step_profile.log" | tail -80 ;;
    overhead) timeout 300 python3 -m benchmarks.host_overhead 2>&1 | tee "$D/overhead.log" | tail -70 ;;
    enginetests) timeout 300 python3 -m pytest -m gpu -q tests/test_gpu_engine.py 2>&1 | tee "$D/engine_tests.log" | tail -25 ;;
    serving) timeout "${SERVING_TIMEOUT_S:-560}" python3 benchmarks/serving.py --model-shape llama2-7b \
               --time-limit-s "${SERVING_LIMIT_S:-420}" --max-run-s 120 --peer-requests 64 --peer-time-limit-s 110 \
               --out "$D" ${SERVING_ARGS:-} 2>&1 | tee "$D/serving.log" | tail -45 \
             || python3 benchmarks/report.py "$D"/serving-*.json | tail -30 ;;
    async) for flag in "" "--no-async-scheduling"; do
             echo "--- batch-1 ${flag:-with asynchronous scheduling}"
             timeout 280 python3 benchmarks/serving.py --model-shape llama2-7b --workloads 1200-128 --clients "" \
               --offline-requests 0 --skip-peer --time-limit-s 200 --out "$D" $flag 2>&1 \
               | tee -a "$D/async.log" | grep -iE "batch-1|decode tok" | tail -4
           done ;;
    prefix) timeout 400 python3 benchmarks/serving.py --model-shape llama2-7b --workloads 1200-128 --clients "" \
              --offline-requests 0 --skip-peer --batch1-repeats 0 --shared-prefix 1024,200,128 \
              --time-limit-s 330 --out "$D" 2>&1 | tee "$D/prefix.log" | grep -E "prefix|TTFT" | tail -8 ;;
    fp8) timeout 400 python3 benchmarks/serving.py --model-shape llama2-7b --workloads 1200-128 --clients "" \
           --offline-requests 512 --skip-peer --time-limit-s 330 --quantization fp8 --out "$D" 2>&1 \
           | tee "$D/fp8.log" | tail -25 ;;
    kvfp8) for extra in "" "--quantization fp8" "--quantization fp8 --token-budget 2048"; do
             echo "--- FP8 KV cache ${extra:+and FP8 weights}"
             timeout 280 python3 benchmarks/serving.py --model-shape llama2-7b --workloads 1200-128 --clients "" \
               --offline-requests 512 --skip-peer --time-limit-s 200 --kv-cache-dtype fp8 $extra --out "$D" 2>&1 \
               | tee -a "$D/kvfp8.log" | grep -E "engine:|batch-1 decode tok|^\| fastgen|Roofline"
           done ;;
    b1profile) # the batch-1 decode step kernel by kernel, bf16 and FP8 weights, both shapes; then the
               # FP8 step with each fusion off in turn (is the fixed cost beside FP8 matmuls the fusions'?)
               for shape in llama2-7b llama3-8b; do
                 for quant in "" "--quantization fp8"; do
                   echo "--- $shape ${quant:-bf16}"
                   timeout 150 python3 -m benchmarks.step_profile --shape "$shape" --decode-only $quant \
                     --out "$D/step_profile-b1-$shape${quant:+-fp8}.json" 2>&1 | tee -a "$D/b1profile.log" | tail -14
                 done
               done
               timeout "${FUSIONS_TIMEOUT_S:-300}" python3 benchmarks/decode_step.py --graphs on --batches 1 \
                 --quantization fp8 --fusions-off "",qkv_rotary,gated_down,norm_linear,all --out "$D" 2>&1 \
                 | tee -a "$D/b1profile.log" | tail -10 ;;
    qkvrows) # 2-8 rows, where the default serves no fusion (the norm prologue costs there): the decode
             # step with none (today's default), with qkv_rotary alone, with rotary_kv alone
             timeout "${FUSIONS_TIMEOUT_S:-300}" python3 benchmarks/decode_step.py --graphs on --batches 2 4 8 \
               --context 384 \
               --fusions-off all,gated_down+norm_linear+rotary_kv,gated_down+norm_linear+qkv_rotary \
               --out "$D" ${FUSIONS_ARGS:-} 2>&1 | tee -a "$D/qkvrows.log" | tail -10 ;;
    fibuild) FIBUILD_LOG="$OUT/flashinfer_build.log"
             if [ -n "${PACK:-}" ]; then mkdir -p "$OUT/_work/flashinfer"; FIBUILD_LOG="$OUT/_work/flashinfer/build.log"; fi
             timeout 420 nice -n 19 env MAX_JOBS=8 python3 benchmarks/flashinfer_peer.py --compile-only \
               > "$FIBUILD_LOG" 2>&1 &
             FIBUILD_PID=$!
             echo "building FlashInfer's kernels in the background (pid $FIBUILD_PID, log $FIBUILD_LOG)" ;;
    tests13) timeout "${TESTS13_TIMEOUT_S:-120}" python3 -m pytest -m gpu -q -p no:cacheprovider \
               ${GPU_TESTS:-tests/test_gpu_stalls.py tests/kernels/test_sampling.py} 2>&1 \
               | tee "$D/gpu_tests.log" | tail -25 ;;
    startup) rm -rf "$STARTUP_CACHE"
             timeout "${STARTUP_TIMEOUT_S:-150}" python3 benchmarks/startup.py --model-shape llama3-8b \
               --triton-cache-dir "$STARTUP_CACHE" --run-timeout-s 130 --out "$D" 2>&1 \
               | tee "$D/startup.log" | tail -16
             export TRITON_CACHE_DIR="$STARTUP_CACHE" ;;  # warm for the phases after this one
    serving8b) timeout "${SERVING8B_TIMEOUT_S:-300}" python3 benchmarks/serving.py --model-shape llama3-8b \
                 --workloads 1200-128,2600-60 --clients 32,16 --offline-token-budgets "${OFFLINE_BUDGETS:-768,2048,4096}" \
                 --peer-requests 0 --peer-time-limit-s 110 --time-limit-s "${SERVING8B_LIMIT_S:-270}" --max-run-s 60 \
                 --out "$D" ${SERVING8B_ARGS:-} 2>&1 | tee "$D/serving8b.log" | grep -E "STALL|FAIL|^\| |^## " | tail -60
               echo "serving8b exit status ${PIPESTATUS[0]} (1: a kernel compiled during a measured run)" ;;
    flashinfer) if [ -n "$FIBUILD_PID" ]; then  # wait at most FIBUILD_WAIT_S for the background build
                  waited=0
                  while kill -0 "$FIBUILD_PID" 2>/dev/null && [ "$waited" -lt "${FIBUILD_WAIT_S:-90}" ]; do
                    sleep 2; waited=$((waited + 2))
                  done
                  if kill -0 "$FIBUILD_PID" 2>/dev/null; then
                    echo "the FlashInfer build still runs after ${waited} s more: the timed run builds what is left"
                  else
                    wait "$FIBUILD_PID"; echo "FlashInfer build exit status $? (waited ${waited} s)"
                  fi
                  tail -4 "$FIBUILD_LOG"
                fi
                timeout "${FLASHINFER_TIMEOUT_S:-150}" python3 benchmarks/flashinfer_peer.py --out "$D" ${FLASHINFER_ARGS:-} 2>&1 \
                  | tee "$D/flashinfer.log" | tail -30 ;;
    snapload) df -h /tmp | tail -1
              timeout "${SNAPLOAD_TIMEOUT_S:-200}" python3 benchmarks/snapshot_load.py --model-shape llama2-7b \
                --quantization none,fp8 --quick --work-dir /tmp/fastgen-snapload --time-limit-s 170 \
                --out "$D/snapshot_load-gpu.md" ${SNAPLOAD_ARGS:-} 2>&1 | tee "$D/snapload.log" | grep -v "it/s]" | tail -45 ;;
    readsweep) # after snapload (its bf16 snapshot): the weight file read to the GPU by each reader variant
               timeout "${READSWEEP_TIMEOUT_S:-150}" python3 benchmarks/snapshot_read_ab.py --device cuda --rounds 2 \
                 --variants "${READ_VARIANTS:-host,staged,staged:8,staged:16}" /tmp/fastgen-snapload/*-snapshot-auto-none \
                 2>&1 | tee "$D/readsweep.log" | tail -12 ;;
    families) for shape in ${FAMILY_SHAPES:-opt-125m qwen-1.8b falcon-7b}; do  # issue 16: one figure per family
                echo "--- $shape"
                timeout "${FAMILY_TIMEOUT_S:-90}" python3 benchmarks/serving.py --model-shape "$shape" \
                  --workloads 1200-128 --clients "" --offline-requests 256 --skip-peer --batch1-repeats 1 \
                  --time-limit-s "$(( ${FAMILY_TIMEOUT_S:-90} - 20 ))" --max-run-s 40 --out "$D" 2>&1 \
                  | tee -a "$D/families.log" | grep -E "^\| (batch-1 decode|offline|kernels)|Roofline|HBM"
              done ;;
    ab) # the same serving run in this tree and in AB_BASE_TREE (an older commit's `git archive`, e.g.
        # .snap/old), one after the other on this machine: a before/after on whichever card came
        base="${AB_BASE_TREE:?ab needs AB_BASE_TREE}"; D="$(cd "$D" && pwd)"  # the base side runs from $base
        kernels=../kernels; if [ -d "$base/kernels/fastgen_kernels" ]; then kernels=../kernels/fastgen_kernels; fi
        if [ ! -e "$base/fastgen/kernels" ]; then ln -s "$kernels" "$base/fastgen/kernels"; fi  # pyproject's mapping
        args="--model-shape llama2-7b --workloads 1200-128 --clients= --offline-requests 512 --skip-peer"
        args="$args --time-limit-s ${AB_LIMIT_S:-95} --max-run-s 60 ${AB_ARGS:-}"
        for side in after before; do
          echo "--- $side"; mkdir -p "$D/$side"
          if [ "$side" = after ]; then
            timeout "$(( ${AB_LIMIT_S:-95} + 30 ))" python3 benchmarks/serving.py $args --out "$D/$side" > "$D/$side.log" 2>&1
          else
            (cd "$base" && FASTGEN_COMMIT="$(cat COMMIT 2>/dev/null)" PYTHONPATH="$PWD:$PYTHONPATH" timeout "$(( ${AB_LIMIT_S:-95} + 30 ))" \
              python3 benchmarks/serving.py $args --out "$D/$side" > "$D/$side.log" 2>&1)
          fi
          grep -E "^\| |engine:|ceilings" "$D/$side.log" | head -14
        done ;;
    *) echo "unknown phase $phase" ;;
  esac
  if [ -n "${PACK:-}" ]; then
    if [ "$phase" = fibuild ]; then rmdir "$D"
    else tar -czf "$OUT/$phase.tgz" -C "$OUT/_work" "$phase" && rm -rf "${OUT:?}/_work/$phase"; fi
  fi
done
if [ -n "$FIBUILD_PID" ] && kill -0 "$FIBUILD_PID" 2>/dev/null; then
  echo "stopping the unfinished FlashInfer build"; kill "$FIBUILD_PID"
fi
if [ -n "${PACK:-}" ]; then rmdir "$OUT/_work" 2>/dev/null || true; fi
if [ -n "${SAVE_TRITON_CACHE:-}" ] && [ -d "$TRITON_HOME_CACHE" ]; then  # at most 15 MiB comes back
  tar -czf /tmp/triton-cache.tgz -C "$TRITON_HOME_CACHE" . \
    && if [ "$(stat -c %s /tmp/triton-cache.tgz)" -lt 15728640 ]; then mv /tmp/triton-cache.tgz "$OUT/"
       else echo "Triton cache too large to bring back: $(du -h /tmp/triton-cache.tgz | cut -f1)"; fi
fi
ls -la "$OUT" | tail -12
