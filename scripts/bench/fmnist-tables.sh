#!/usr/bin/env bash
# The paper's accuracy tables (ASTRA.md §5) at small scale, on Fashion-MNIST, on one GPU:
# a ViT (D=192, 6 blocks, 3 heads, MLP 768, patch 4 → 49 tokens + CLS) trained from scratch per seed,
# codebooks calibrated per seed and G, then ASTRA fine-tuning runs:
#   main rows (Table 1): G ∈ {1, 4, 16, 32}, N = 4, λ = 1, β = 5e-4, distributed CLS, every seed;
#   Table 2: N ∈ {2, 7} (N = 4 from the main rows), G = 16, first seed;
#   NAQ: λ ∈ {0, 0.1, 0.3} (1 from the main rows), G = 16;  DCT: single CLS at G ∈ {1, 16, 32};
#   β ∈ {0, 1e-4, 0.25} (5e-4 from the main rows), G = 16;
#   Table 9: G = 16, N = 4 trained on random allocations (--random-partition), and both it and the
#   main row swept under random allocations (astra-eval accuracy --partition allocation), by FPAR
#   quintile, beside the original plain model (--baseline).
# Every run selects its epoch on 10% of the training images held out (astra-train --valid) and
# scores that model on the test split once (complete.json).
# Runs go JOBS at a time (the GPU is far from busy with one small ViT). Each run folder keeps its
# summary.csv (per-epoch wall seconds) and a time.txt; scripts/bench/tables.py makes the tables.
#   scripts/bench/fmnist-tables.sh FASHION_MNIST_DIR OUT_DIR
# Environment: SEEDS ("1 2 3"), BASE_EPOCHS (20), ASTRA_EPOCHS (5), K (256), JOBS (6), DEVICE (cuda),
# BF16 (--bf16), EXTRA (more training flags, e.g. "--max-train 512" for a smoke test).
set -euo pipefail
data=${1:?usage: fmnist-tables.sh FASHION_MNIST_DIR OUT_DIR}
out=${2:?usage: fmnist-tables.sh FASHION_MNIST_DIR OUT_DIR}
seeds=(${SEEDS:-1 2 3})
base_epochs=${BASE_EPOCHS:-20}
astra_epochs=${ASTRA_EPOCHS:-5}
k=${K:-256}
jobs=${JOBS:-6}
device=${DEVICE:-cuda}
bf16=${BF16---bf16}
mkdir -p "$out"
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-2} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# shellcheck source=../lib/runs.sh
source "$(dirname "$0")/../lib/runs.sh"

common="--data fashion-mnist:$data --batch 256 --device $device $bf16 --pad 2 --flip ${EXTRA:-}"

# 1. Baselines, one per seed, in parallel.
for s in "${seeds[@]}"; do
  echo "run base-s$s astra-train finetune $common --epochs $base_epochs --lr 1e-3 --warmup-steps 500 --hidden 192 --layers 6 --heads 3 --mlp 768 --patch 4 --seed $s --out $out/base-s$s"
done | xargs -P "$jobs" -I{} bash -c '{}'

# 2. Codebooks per seed and G.
for s in "${seeds[@]}"; do
  for g in 1 4 16 32; do
    echo "run cb-s$s-g$g astra-train calibrate --model $out/base-s$s --data fashion-mnist:$data --samples 2000 --groups $g --k $k --iters 20 --device $device --out $out/cb-s$s-g$g.safetensors"
  done
done | xargs -P "$jobs" -I{} bash -c '{}'

# 3. ASTRA fine-tuning.
astra() { # NAME SEED G then extra flags
  local name=$1 s=$2 g=$3; shift 3
  echo "run $name astra-train astra $common --epochs $astra_epochs --lr 2e-4 --warmup-steps 100 --init $out/base-s$s --codebooks $out/cb-s$s-g$g.safetensors --seed $s --out $out/$name $*"
}
{
  for s in "${seeds[@]}"; do
    for g in 1 4 16 32; do astra "astra-s$s-g$g-n4" "$s" "$g" --devices 4; done
  done
  s=${seeds[0]}
  for n in 2 7; do astra "astra-s$s-g16-n$n" "$s" 16 --devices "$n"; done
  for l in 0 0.1 0.3; do astra "astra-s$s-g16-n4-lambda$l" "$s" 16 --devices 4 --lambda "$l"; done
  for g in 1 16 32; do astra "astra-s$s-g$g-n4-single" "$s" "$g" --devices 4 --single-cls; done
  for b in 0 1e-4 0.25; do astra "astra-s$s-g16-n4-beta$b" "$s" 16 --devices 4 --beta "$b"; done
  astra "astra-s$s-g16-n4-alloc" "$s" 16 --devices 4 --random-partition
} | xargs -P "$jobs" -I{} bash -c '{}'

# 4. Table 9 analogue: accuracy under random allocations, by FPAR quintile.
s=${seeds[0]}
for name in "astra-s$s-g16-n4" "astra-s$s-g16-n4-alloc"; do
  echo "run sweep-${name#astra-} astra-eval accuracy --model $out/$name --baseline $out/base-s$s --data fashion-mnist:$data --devices 4 --partition allocation,contiguous --vq on --batch 64 --seed 7 --device $device --json $out/sweep-${name#astra-}.json"
done | xargs -P "$jobs" -I{} bash -c '{}'
echo "all runs finished in $out"
