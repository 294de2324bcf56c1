#!/usr/bin/env bash
# Kernel (tc tbf in network namespaces) vs user-space (each worker paces its uplink) shaping of
# the same runtime runs: a random ViT (D = 192, 6 blocks, 64×64 images, patch 8: 64 tokens), 4
# workers, batch 32, SP and ASTRA G = 16 (K = 256), at 2, 5 and 10 Mbit/s; median of RUNS runs.
# Needs root for the kernel column (scripts/netem.sh check).
#   scripts/bench/shaper-agreement.sh OUT_DIR      (binaries from target/release, or BIN)
set -euo pipefail
out=${1:?usage: shaper-agreement.sh OUT_DIR}
bin=${BIN:-target/release}
runs=${RUNS:-3}
mkdir -p "$out"
py=${PYTHON:-$( [[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
echo '{"model_type": "vit", "hidden_size": 192, "num_hidden_layers": 6, "num_attention_heads": 3, "intermediate_size": 768, "image_size": 64, "patch_size": 8, "num_channels": 3, "num_labels": 10}' >"$out/vit.json"
[[ -d $out/vit ]] || "$bin/astra-train" init --model-config "$out/vit.json" --out "$out/vit" >/dev/null
[[ -f $out/vit/codebooks.safetensors ]] || "$bin/astra-train" calibrate --model "$out/vit" --data fake:600x64 \
  --samples 500 --groups 16 --k 256 --iters 5 --out "$out/vit/codebooks.safetensors" >/dev/null
$py -c "import numpy as np; np.save('$out/x.npy', np.random.default_rng(1).standard_normal((8, 3, 64, 64)).astype(np.float32))"
echo "| mode | Mbit/s | kernel (ms) | user space (ms) | user / kernel |"
echo "|---|---:|---:|---:|---:|"
for mode in sp astra; do
  for rate in 2 5 10; do
    row="| $mode | $rate |"
    declare -A ms=()
    for shaper in kernel user; do
      "$bin/astra-eval" distributed --model "$out/vit" --mode "$mode" --devices 4 --links "$rate" --shaper "$shaper" \
        --input "$out/x.npy" --out "$out/y.npy" --runs "$runs" --warmup 1 --threads 1 --json "$out/s.json" >/dev/null
      ms[$shaper]=$($py -c "import json; print(json.load(open('$out/s.json'))['median_ms'])")
      row+=" $(printf %.1f "${ms[$shaper]}") |"
    done
    echo "$row $($py -c "print(f'{${ms[user]} / ${ms[kernel]}:.3f}')") |"
  done
done
