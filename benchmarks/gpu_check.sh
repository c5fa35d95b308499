#!/usr/bin/env bash
# The efficiency table on a GPU (issue 19), ready for a lent device: LLaVA-1.5-7B's shape (CLIP ViT-L/14-336 +
# Llama 32 x 4096) with random weights -- nothing is downloaded but packages -- in bf16 with sdpa (and
# flash-attention 2 when a prebuilt wheel installs), batch 1 and 8, 576 visual + 64 text tokens: full, the ideal,
# RCP at the 192 / 128 / 64 schedules (the authors' placements, fixed counts), VisPruner, FastV and random at the
# same visual tokens per layer; prefill, decode per token, 32-token end-to-end, peak memory, KV bytes (measured and
# analytic). Writes efficiency_llava-1.5-7b_gpu.{md,json,png} into OUT_DIR. About 5-8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # on the GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --cpu [OUT_DIR]    # the same steps on the CPU with the tiny shape, in seconds
set -euo pipefail
cd "$(dirname "$0")/.."
mode=gpu
if [[ "${1:-}" == "--cpu" ]]; then mode=cpu; shift; fi
out="${1:-${OUT:-outputs/benchmarks}}"
mkdir -p "$out"
start=$(date +%s)

if [[ "$mode" == gpu ]]; then
  # Installs from the package registries only; torch first if missing (the registry's default build is CUDA).
  python -c "import torch" 2>/dev/null || pip install -q torch
  python -c "import modeling_rcp_llava" 2>/dev/null || pip install -q -e .
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device (use --cpu)')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  args=(--preset llava-1.5-7b --device cuda --batch_sizes 1,8 --repeats 3 --new_tokens 32)
  # flash-attention 2 only from a prebuilt wheel: a source build takes far longer than this check may.
  flash=0
  if timeout 120 pip install -q --only-binary :all: flash-attn >/dev/null 2>&1 && python -c "import flash_attn" 2>/dev/null; then
    flash=1
  fi
else
  args=(--preset tiny --device cpu --batch_sizes 1,2 --repeats 1 --new_tokens 4 --budgets 64)
  flash=0
fi

python benchmarks/efficiency.py "${args[@]}" --output_dir "$out" --overwrite
if [[ "$flash" == 1 ]]; then
  python benchmarks/efficiency.py "${args[@]}" --output_dir "$out" --overwrite --attn_implementation flash_attention_2 \
    --methods full,rcp,ideal --tag flash
else
  echo "gpu_check: flash-attention 2 not run (no prebuilt wheel installed, or CPU mode)"
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s; tables in $out"
