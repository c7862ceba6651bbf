#!/usr/bin/env bash
# The one prepared GPU check (perf/NOTES.md says why and what to look at). Run from the repository root
# on the GPU machine, where nothing can be installed: torch/triton/pandas/matplotlib/pytest are the image's.
#   OUT=/some/folder bash perf/gpu_check.sh
# Writes at most 7 files to $OUT (the device tool brings back 8): gpu.txt, tests-cuda.txt, tests-cpp-launch.txt,
# bench.log,
# bench.tgz (the whole triton-bn bench output folder, with MODEL_S > 0 the model steps (model-<name>/), with
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
# Time limits (seconds): their sum must stay under one device call's 600 s; 0 skips a step. Two prepared runs
# cover [gpu]'s targets 1-3 (perf/NOTES.md, "What a GPU session should run next"):
#   run A (the defaults): tests, layer bench, ResNet-50 steps eager and CUDA-graphed:
#     at most 100 + 100 + 50 + (100 + 60) + 170 = 580 s
#   run B: TESTS_S=0 CPP_TESTS_S=0 LAUNCH_ABI_S=0 BENCH_BUDGET_S=0 MODEL_S=540 \
#          MODEL_NAMES="efficientnet_b0 resnet50" MODEL_ARGS="--graphs --compile" bash perf/gpu_check.sh
TESTS_S=${TESTS_S:-100}            # the CUDA tests (killed after this)
CPP_TESTS_S=${CPP_TESTS_S:-100}    # the same through the C++ launch path
LAUNCH_ABI_S=${LAUNCH_ABI_S:-50}   # tests/test_launch.py (plans against this triton's PTX)
BENCH_BUDGET_S=${BENCH_BUDGET_S:-100}  # bench starts no new measurement after this, then writes its reports (<= 60 s)
BENCH_ARGS=${BENCH_ARGS:---quick --graphs}  # --graphs: GPU time alone too (CUDA graph replay)
# CUDA-parametrised tests and GPU-only tests (with the interpreter off, CPU cases would take the CPU backends);
# tuning off here: correctness of the heuristic tiles, without a compile per candidate. Eight workers:
# compiling kernels is what takes the time, and it is CPU work.
if [ "$TESTS_S" -gt 0 ]; then
TRITON_BN_AUTOTUNE=0 timeout "$TESTS_S" python3 -m pytest -q -n 8 --maxfail=20 -p no:cacheprovider -k "cuda or gpu" tests \
  > "$OUT/tests-cuda.txt" 2>&1
echo "tests exit $?" >> "$OUT/tests-cuda.txt"
fi
# The same CUDA tests through the C++ launch path (docs/launch.md; opt-in until this passes on a GPU), and
# its own tests (the recording stand-in, which also checks every plan against the PTX of this triton)
if [ "$CPP_TESTS_S" -gt 0 ]; then
TRITON_BN_AUTOTUNE=0 TRITON_BN_CPP_LAUNCH=1 timeout "$CPP_TESTS_S" python3 -m pytest -q -n 8 --maxfail=20 \
  -p no:cacheprovider -k "cuda or gpu" tests > "$OUT/tests-cpp-launch.txt" 2>&1
echo "tests exit $?" >> "$OUT/tests-cpp-launch.txt"
fi
if [ "$LAUNCH_ABI_S" -gt 0 ]; then
timeout "$LAUNCH_ABI_S" python3 -m pytest -q -n 8 -p no:cacheprovider tests/test_launch.py >> "$OUT/tests-cpp-launch.txt" 2>&1
echo "launch tests exit $?" >> "$OUT/tests-cpp-launch.txt"
fi
mkdir -p "$OUT/bench"
if [ "$BENCH_BUDGET_S" -gt 0 ]; then
# shellcheck disable=SC2086
timeout $((BENCH_BUDGET_S + 60)) python3 -m triton_bn bench $BENCH_ARGS --budget-s "$BENCH_BUDGET_S" \
  --out "$OUT/bench" > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"
cp "$OUT/bench/summary.md" "$OUT/summary.md" 2>/dev/null
fi
# whole training steps ([gpu] target 1), original vs converted, converted through the C++ launch path where it
# builds, with --graphs the whole step replayed from a CUDA graph and with --compile under torch.compile;
# MODEL_S seconds at most for all the models (each its own folder with model.csv and model.md, written after
# each precision: a cut run keeps what it finished); heuristic tiles, so that new layer shapes cost no tuning
MODEL_S=${MODEL_S:-170}
MODEL_NAMES=${MODEL_NAMES:-resnet50}
MODEL_ARGS=${MODEL_ARGS:---graphs}
if [ "$MODEL_S" -gt 0 ]; then
  model_started=$(date +%s)
  for model in $MODEL_NAMES; do
    left=$((MODEL_S - ($(date +%s) - model_started)))
    [ "$left" -gt 10 ] || break
    # shellcheck disable=SC2086
    TRITON_BN_AUTOTUNE=0 timeout "$left" python3 -m triton_bn bench --model "$model" $MODEL_ARGS --steps 10 \
      --out "$OUT/bench/model-$model" > "$OUT/bench/model-$model.log" 2>&1
    echo "model $model exit $?" >> "$OUT/bench/model-$model.log"
  done
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
