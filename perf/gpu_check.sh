#!/usr/bin/env bash
# The one prepared GPU check (perf/NOTES.md says why and what to look at). Run from the repository root
# on the GPU machine, where nothing can be installed: torch/triton/pandas/matplotlib/pytest are the image's.
#   OUT=/some/folder bash perf/gpu_check.sh
# Writes at most 7 files to $OUT (the device tool brings back 8): gpu.txt, tests-cuda.txt, tests-cpp-launch.txt,
# bench.log,
# bench.tgz (the whole triton-bn bench output folder, with MODEL_S > 0 the ResNet-50 steps, with
# SHORT_LOOPS_S > 0 perf/short_loops.py's tables and with LATENCY_S > 0 the latency tables in it),
# summary.md (a copy, readable at once), and with
# PROFILE_S > 0 profile.tgz (perf/profile_gpu.py's files).
set -uo pipefail
OUT=${OUT:-/tmp/triton-bn-gpu}
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1 TRITON_INTERPRET=0  # compiled kernels on CUDA tensors
# The native CPU kernels (csrc/cpu/) compile in ~2 minutes on first use: device time this check
# must not spend on a CPU path it does not measure (a CPU tensor reaching the pure path takes PyTorch's kernels).
export TRITON_BN_NATIVE_CPU=0
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } > "$OUT/gpu.txt" 2>&1
# Time limits (seconds): their sum, with the optional steps below, must stay under one device call's 600 s
# (the defaults: at most 110 + 110 + 60 + 150 + 90 = 520 s)
TESTS_S=${TESTS_S:-110}            # the CUDA tests (killed after this)
CPP_TESTS_S=${CPP_TESTS_S:-110}    # the same through the C++ launch path
LAUNCH_ABI_S=${LAUNCH_ABI_S:-60}   # tests/test_launch.py (plans against this triton's PTX)
BENCH_BUDGET_S=${BENCH_BUDGET_S:-150}  # bench starts no new measurement after this, then writes its reports (<= 90 s)
BENCH_ARGS=${BENCH_ARGS:---quick --graphs}  # --graphs: GPU time alone too (CUDA graph replay)
# CUDA-parametrised tests and GPU-only tests (with the interpreter off, CPU cases would take reference.py);
# tuning off here: correctness of the heuristic tiles, without a compile per candidate. Eight workers:
# compiling kernels is what takes the time, and it is CPU work.
TRITON_BN_AUTOTUNE=0 timeout "$TESTS_S" python3 -m pytest -q -n 8 --maxfail=20 -p no:cacheprovider -k "cuda or gpu" tests \
  > "$OUT/tests-cuda.txt" 2>&1
echo "tests exit $?" >> "$OUT/tests-cuda.txt"
# The same CUDA tests through the C++ launch path (docs/launch.md; opt-in until this passes on a GPU), and
# its own tests (the recording stand-in, which also checks every plan against the PTX of this triton)
TRITON_BN_AUTOTUNE=0 TRITON_BN_CPP_LAUNCH=1 timeout "$CPP_TESTS_S" python3 -m pytest -q -n 8 --maxfail=20 \
  -p no:cacheprovider -k "cuda or gpu" tests > "$OUT/tests-cpp-launch.txt" 2>&1
echo "tests exit $?" >> "$OUT/tests-cpp-launch.txt"
timeout "$LAUNCH_ABI_S" python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_launch.py >> "$OUT/tests-cpp-launch.txt" 2>&1
echo "launch tests exit $?" >> "$OUT/tests-cpp-launch.txt"
# shellcheck disable=SC2086
timeout $((BENCH_BUDGET_S + 90)) python3 -m triton_bn bench $BENCH_ARGS --budget-s "$BENCH_BUDGET_S" \
  --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"
cp "$OUT/bench/summary.md" "$OUT/summary.md" 2>/dev/null
# optional: whole ResNet-50 training steps, original vs converted, and converted through the C++ launch path
# where it builds ([launch] target 2; model.csv, model.md in the bench folder), MODEL_S seconds at most;
# heuristic tiles, so that ~20 new layer shapes cost no tuning time
MODEL_S=${MODEL_S:-0}
if [ "$MODEL_S" -gt 0 ]; then
  TRITON_BN_AUTOTUNE=0 timeout "$MODEL_S" python3 -m triton_bn bench --model resnet50 --steps 10 --out "$OUT/bench" \
    > "$OUT/bench/model.log" 2>&1
  echo "model exit $?" >> "$OUT/bench/model.log"
fi
# optional: the two reductions alone per configuration (perf/short_loops.py), SHORT_LOOPS_S seconds at most
SHORT_LOOPS_S=${SHORT_LOOPS_S:-0}
if [ "$SHORT_LOOPS_S" -gt 0 ]; then
  OUT="$OUT/bench" timeout "$SHORT_LOOPS_S" python3 perf/short_loops.py > "$OUT/bench/short_loops.log" 2>&1
  echo "short_loops exit $?" >> "$OUT/bench/short_loops.log"
fi
# optional: the deployed models at batch 1 and 8 on the GPU (triton-bn bench --latency; [deploy]'s target 4:
# there launches, not convolutions, may dominate at batch 1), LATENCY_S seconds at most
LATENCY_S=${LATENCY_S:-0}
if [ "$LATENCY_S" -gt 0 ]; then
  timeout "$LATENCY_S" python3 -m triton_bn bench --latency --out "$OUT/bench/latency" > "$OUT/bench/latency.log" 2>&1
  echo "latency exit $?" >> "$OUT/bench/latency.log"
fi
tar czf "$OUT/bench.tgz" -C "$OUT" bench && rm -rf "$OUT/bench"
# optional: where the time of a call goes (perf/profile_gpu.py), PROFILE_S seconds at most
PROFILE_S=${PROFILE_S:-0}
if [ "$PROFILE_S" -gt 0 ]; then
  mkdir -p "$OUT/profile"
  OUT="$OUT/profile" timeout "$PROFILE_S" python3 perf/profile_gpu.py > "$OUT/profile/profile.log" 2>&1
  tar czf "$OUT/profile.tgz" -C "$OUT" profile && rm -rf "$OUT/profile"
fi
tail -5 "$OUT/tests-cuda.txt"; tail -3 "$OUT/bench.log"
