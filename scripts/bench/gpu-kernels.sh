#!/usr/bin/env bash
# The CUDA kernels on the GPU machine: their tests against the ATen path (the release test binary
# of astra-train/tests/cuda_kernels.rs), the parts of an ASTRA ViT-B block with and without them,
# and a short Fashion-MNIST training (2 epochs plain, calibration, 1 epoch ASTRA) with and without
# them, whose accuracies must agree.
#   scripts/bench/gpu-kernels.sh OUT_DIR [tests] [parts] [train]   (after `source .gpu/env.sh`;
#       the test binary at .gpu/bin/cuda_kernels, data at .gpu/data/fashion-mnist)
set -euo pipefail
out=${1:?usage: gpu-kernels.sh OUT_DIR [tests] [parts] [train]}
shift
steps=${*:-tests parts train}
mkdir -p "$out"
has() { [[ " $steps " == *" $1 "* ]]; }

if has tests; then
  # A failing test is reported, not fatal: the timings below still come back.
  .gpu/bin/cuda_kernels --test-threads 1 --nocapture >"$out/kernel-tests.txt" 2>&1 ||
    echo "kernel tests FAILED (see kernel-tests.txt)"
  tail -3 "$out/kernel-tests.txt"
fi
if has parts; then
  astra-train bench-step --model vit --batch 128 --bf16 --parts --steps 10 --device cuda |
    tee "$out/vit-block-parts.md"
  # The stacked-bar figure's data (astra-sim plot-bars --stacked --csv OUT/block-parts.csv …).
  python3 "$(dirname "$0")/parts_stack.py" "$out/vit-block-parts.md" >"$out/block-parts.csv"
fi
if has train; then
  data=fashion-mnist:.gpu/data/fashion-mnist
  C="--data $data --batch 256 --device cuda --pad 2 --flip --bf16"
  for k in 1 0; do
    run=$out/train-kernels-$k
    export ASTRA_CUDA_KERNELS=$k
    astra-train finetune $C --epochs 2 --lr 1e-3 --warmup-steps 300 --hidden 192 --layers 6 \
      --heads 3 --mlp 768 --patch 4 --seed 1 --out "$run/base" >"$run.log" 2>&1
    astra-train calibrate --model "$run/base" --data $data --samples 2000 --groups 16 --k 256 \
      --device cuda --out "$run/cb.safetensors" >>"$run.log" 2>&1
    astra-train astra $C --epochs 1 --lr 2e-4 --warmup-steps 100 --init "$run/base" \
      --codebooks "$run/cb.safetensors" --devices 4 --seed 1 --out "$run/astra" >>"$run.log" 2>&1
    for m in base astra; do
      echo "kernels=$k $m: $(tr -d '\n ' <"$run/$m/complete.json")"
    done | tee -a "$out/train.txt"
  done
  unset ASTRA_CUDA_KERNELS
fi
