#!/usr/bin/env bash
# A first N = 4 / 8 probe of the runtime on a 16-core machine (the GPU machine's CPUs), links
# shaped in user space (no iproute2 or root needed): the paper's 12×768 encoder at T = 1024 (512²
# images, patch 16, random weights), batch 1, K = 1024; one device = 16/N threads, and the single
# device is measured with the same threads; median of 3 runs after 1 warm-up.
#   bash scripts/bench/runtime-n4-probe.sh        (on the GPU machine: from the bundle, .gpu/env.sh)
set -euo pipefail
if [[ -f .gpu/env.sh ]]; then source .gpu/env.sh; unset LD_PRELOAD; fi
d=/tmp/n4; mkdir -p $d
echo '{"architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": 512, "patch_size": 16, "num_channels": 3, "qkv_bias": true, "num_labels": 1000}' > $d/vit.json
[[ -d $d/vit ]] || astra-train init --model-config $d/vit.json --out $d/vit >/dev/null
for g in 1 32; do
  [[ -f $d/cb-g$g.safetensors ]] || astra-train calibrate --model $d/vit --data fake:4x512 --samples 3 --groups $g --k 1024 --iters 2 --noise none --out $d/cb-g$g.safetensors >/dev/null
done
python3 -c "import numpy as np; np.save('$d/x.npy', np.random.default_rng(0).standard_normal((1, 3, 512, 512)).astype(np.float32))"
run() { astra-eval distributed --model $d/vit --input $d/x.npy --out $d/y.npy --runs 3 --warmup 1 --json $d/s.json "$@" >/dev/null; python3 -c "import json; s=json.load(open('$d/s.json')); print(f\"{s['median_ms']:.0f} ms, network: {s['network']}, sent per worker: {s['sent_bytes']}\")"; }
echo "single (16 threads):"; run --devices 1 --threads 16
for n in 4 8; do
  t=$((16 / n))
  echo "N=$n single (threads $t):"; run --devices 1 --threads $t
  for g in 1 32; do
    echo "N=$n G=$g 10 Mbit/s user-shaped (threads $t):"; run --devices $n --threads $t --codebooks $d/cb-g$g.safetensors --links 10 --shaper user
  done
done
