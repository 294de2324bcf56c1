#!/usr/bin/env bash
# Data-parallel training through NCCL (issue 26): `--gpus 1` against the plain single-process
# path on the same GPU (weights and metrics bit for bit, plain ViT and ASTRA), then, for each N
# in GPUS that the machine has, the same runs on N GPUs at the same global batch (throughput
# and the loss curve against N = 1). Random fake images (fake:IMAGESx32), a small ViT.
#   scripts/bench/multi-gpu.sh OUT_DIR
# Environment: BIN (target/release), GPUS ("2 4 8"; counts above the machine's are skipped),
# IMAGES (4096), EPOCHS (2), BATCH (128), PYTHON (python3, with torch and safetensors).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: multi-gpu.sh OUT_DIR}
bin=${BIN:-target/release}
py=${PYTHON:-python3}
images=${IMAGES:-4096}
read -r -a gpu_list <<<"${GPUS:-2 4 8}"
mkdir -p "$out"
have=$($py -c "import torch; print(torch.cuda.device_count())")
common=(--data "fake:${images}x32" --epochs "${EPOCHS:-2}" --batch "${BATCH:-128}" --max-test 512 --lr 1e-3
  --warmup-steps 10)
vit=(--hidden 192 --layers 6 --heads 3 --mlp 768 --patch 4)
plain() { # NAME ARGS...: a plain ViT run
  local name=$1; shift
  [[ -s $out/$name/complete.json ]] || $bin/astra-train finetune "${common[@]}" "${vit[@]}" --out "$out/$name" "$@" \
    >"$out/$name.log" 2>&1 || { echo "$name failed: $(tail -1 "$out/$name.log")" >&2; exit 1; }
}
astra() { # NAME ARGS...: an ASTRA run (N = 4 devices, G = 4, K = 64) from the plain model
  local name=$1; shift
  [[ -s $out/$name/complete.json ]] || $bin/astra-train astra "${common[@]}" --init "$out/plain" \
    --codebooks "$out/cb.safetensors" --devices 4 --out "$out/$name" "$@" >"$out/$name.log" 2>&1 ||
    { echo "$name failed: $(tail -1 "$out/$name.log")" >&2; exit 1; }
}
plain plain --device cuda
plain plain-gpus1 --gpus 1
[[ -s $out/cb.safetensors ]] || $bin/astra-train calibrate --model "$out/plain" --data "fake:${images}x32" --samples 1024 \
  --groups 4 --k 64 --noise diagonal --out "$out/cb.safetensors" >"$out/cb.log" 2>&1
astra astra --device cuda
astra astra-gpus1 --gpus 1
for n in "${gpu_list[@]}"; do
  if ((n > have)); then echo "skipping --gpus $n: $have GPU(s) here"; continue; fi
  plain "plain-gpus$n" --gpus "$n"
  astra "astra-gpus$n" --gpus "$n"
done
$py scripts/bench/multi_gpu_table.py "$out" | tee "$out/table.md"
