#!/usr/bin/env bash
# Training throughput on the GPU, ours against PyTorch (HF transformers) in the same call:
# ViT-B/16 224² batch 128 and GPT-2 small 1024 tokens batch 8, bf16 autocast, AdamW, random data.
# Ours with the CUDA kernels (the default), with ASTRA_CUDA_KERNELS=0 (the ATen path), ASTRA with
# ASTRA_NEAREST=fma (the nearest-codeword search on CUDA cores, not tensor cores) and =streamed
# (tensor cores, codewords streamed), ViT plain with ASTRA_LINEARS=separate (q, k, v as three
# GEMMs), and GPT-2 also with ASTRA_LM_LOSS=unfused (the logits formed and kept for autograd's cross-entropy);
# the peer three ways: sdpa with torch.optim.AdamW's foreach update, with its fused update, and
# under torch.compile.
#   scripts/bench/gpu-throughput.sh OUT.md      (needs astra-train on PATH and python3 with
#                                                torch + transformers, e.g. after .gpu/env.sh)
#   PEERS=0 ...                                 (ours only)
set -euo pipefail
out=${1:?usage: gpu-throughput.sh OUT.md}
here=$(cd "$(dirname "$0")" && pwd)
steps=${STEPS:-20}
ours() { # model args...: our rows with the kernels, then without (marked), then GPT-2's with
  # autograd's LM head and cross-entropy (marked)
  astra-train bench-step "$@" --bf16 --steps "$steps" --device cuda | tail -n +3
  ASTRA_CUDA_KERNELS=0 astra-train bench-step "$@" --bf16 --steps "$steps" --device cuda | tail -n +5 |
    sed 's/^| \([^|]*\) |/| \1 — ATen path (kernels off) |/'
  # ASTRA with the nearest-codeword search on CUDA cores (fp32 FMAs) instead of tensor cores, and
  # on tensor cores with the codewords streamed through shared memory (not resident there).
  ASTRA_NEAREST=fma astra-train bench-step "$@" --bf16 --steps "$steps" --device cuda |
    grep '^| ASTRA' | sed 's/^| \([^|]*\) |/| \1 — search on CUDA cores |/'
  ASTRA_NEAREST=streamed astra-train bench-step "$@" --bf16 --steps "$steps" --device cuda |
    grep '^| ASTRA' | sed 's/^| \([^|]*\) |/| \1 — codewords streamed |/'
  if [[ " $* " == *" vit "* ]]; then
    # ViT's query, key and value as three GEMMs (one, over their weights concatenated, by default).
    ASTRA_LINEARS=separate astra-train bench-step "$@" --bf16 --steps "$steps" --device cuda |
      grep '^| plain' | sed 's/^| \([^|]*\) |/| \1 — q, k, v as three GEMMs |/'
  fi
  [[ " $* " == *" gpt2 "* ]] || return 0
  ASTRA_LM_LOSS=unfused astra-train bench-step "$@" --bf16 --steps "$steps" --device cuda |
    tail -n +5 | sed 's/^| \([^|]*\) |/| \1 — LM head and loss unfused |/'
}
peers() {
  [[ ${PEERS:-1} == 0 ]] && return
  python3 "$here/hf_throughput.py" "$@" --steps "$steps"
  python3 "$here/hf_throughput.py" "$@" --steps "$steps" --fused
  python3 "$here/hf_throughput.py" "$@" --steps "$steps" --compile 2>/dev/null
}
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
  ours --model vit --batch 128
  peers --model vit --batch 128
  echo
  echo "## GPT-2 small, 1024 tokens, batch 8, bf16 autocast"
  echo
  ours --model gpt2 --seq 1024 --batch 8
  peers --model gpt2 --batch 8 --seq 1024
} | tee "$out"
# The figure's data: ours / HF eager with the fused AdamW (astra-sim plot-bars --csv …).
python3 "$here/throughput_ratios.py" "$out" >"${out%.md}-vs-pytorch.csv"
