#!/usr/bin/env bash
# Accelerator checks and real-scale measurements, in one script for a GPU machine.
#
#   bash launch/gpu_checks.sh [OUT_DIR]        (default outputs/gpu_checks)
#
# 1. gpu_tests     the GPU-only tests (fp32 GPU == CPU, bf16 XLA / cuDNN vs fp32, streaming rollout
#                  GPU == CPU)
# 2. stream_1_3b   launch/benchmark.py: streaming chunk latency of Wan2.1-1.3B (random weights, bf16
#                  params and compute, cuDNN attention, 480x832 -> 60x104 latents, no VAE decode)
# 3. train_1_3b    launch/benchmark_train.py: one flow-matching train step of Wan2.1-1.3B on 21
#                  latent frames (diffusion forcing, and teacher forcing = 42 frames of tokens):
#                  compile, step time, memory, MFU
# 4. dmd_1_3b      launch/benchmark_train.py: one self-forcing DMD step at 1.3B (student, teacher
#                  and critic, 3 chunks, 1 critic step)
# Each section runs under its own time limit (SECTION_LIMITS, seconds), logs to OUT_DIR/<name>.log
# and the benchmarks also write JSON; a failing section does not stop the next.
set -u
OUT=${1:-outputs/gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
read -r L_TESTS L_STREAM L_TRAIN L_DMD <<<"${SECTION_LIMITS:-60 80 130 90}"
PY=${PYTHON:-python3}

section() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit} s)"
  local t0
  t0=$(date +%s)
  timeout -s INT -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  grep -v '^[IWE][0-9]\{4\} ' "$OUT/$name.log" | tail -n 30
  echo "=== $name: rc=$rc in $(($(date +%s) - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
$PY -c "import jax, flax, optax, orbax.checkpoint as o; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

section gpu_tests "$L_TESTS" $PY -m pytest -q -p no:cacheprovider -s -m gpu tests/models/test_gpu.py

section stream_1_3b "$L_STREAM" $PY launch/benchmark.py --config=configs/wan_1_3b.py \
  --config.model.attention=cudnn --config.model.param_dtype=bfloat16 --config.vae.kind=none \
  --policies=window,adastate --num_chunks=6 --json="$OUT/stream_1_3b.json"

section train_1_3b "$L_TRAIN" $PY launch/benchmark_train.py --config=configs/wan_1_3b_train.py:teacher \
  --config.train.batch_size=1 --frames=21 --steps=3 --warmup=1 --peak_tflops=989 \
  --variants="train.attention=diffusion_forcing;train.attention=teacher_forcing" \
  --json="$OUT/train_1_3b.json"

section dmd_1_3b "$L_DMD" $PY launch/benchmark_train.py --config=configs/wan_1_3b_train.py:dmd,adastate \
  --config.train.batch_size=1 --config.train.critic_steps=1 --frames=9 --steps=2 --warmup=1 \
  --json="$OUT/dmd_1_3b.json"
