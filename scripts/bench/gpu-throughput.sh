#!/usr/bin/env bash
# Training throughput on the GPU, ours against PyTorch (HF transformers) in the same call:
# ViT-B/16 224² batch 128 and GPT-2 small 1024 tokens batch 8, bf16 autocast, AdamW, random data.
#   scripts/bench/gpu-throughput.sh OUT.md      (needs astra-train on PATH and python3 with
#                                                torch + transformers, e.g. after .gpu/env.sh)
set -euo pipefail
out=${1:?usage: gpu-throughput.sh OUT.md}
here=$(cd "$(dirname "$0")" && pwd)
steps=${STEPS:-20}
{
  echo "# Training throughput: ours vs PyTorch (HF transformers), same call, same GPU"
  echo
  echo "Device: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1);" \
    "torch $(python3 -c 'import torch; print(torch.__version__)')," \
    "transformers $(python3 -c 'import transformers; print(transformers.__version__)')." \
    "Median of $steps steps after 5 warm-up steps."
  echo
  echo "## ViT-B/16, 224², batch 128, bf16 autocast"
  echo
  astra-train bench-step --model vit --batch 128 --bf16 --steps "$steps" --device cuda | tail -n +3
  python3 "$here/hf_throughput.py" --model vit --batch 128 --steps "$steps"
  echo
  echo "## GPT-2 small, 1024 tokens, batch 8, bf16 autocast"
  echo
  astra-train bench-step --model gpt2 --seq 1024 --batch 8 --bf16 --steps "$steps" --device cuda | tail -n +3
  python3 "$here/hf_throughput.py" --model gpt2 --batch 8 --seq 1024 --steps "$steps"
} | tee "$out"
