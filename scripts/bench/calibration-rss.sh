#!/usr/bin/env bash
# Peak host memory (RSS) of `astra-train calibrate` at the paper's model shapes, on randomly
# initialised models (the memory does not depend on the weights): ViT-B/16 at 224² on fake images,
# GPT-2 medium with 1024-token windows on a text corpus. K = 1024, G = 32, full-covariance NAQ.
# k-means runs ITERS iterations only (the footprint does not depend on them).
#   scripts/bench/calibration-rss.sh TEXT_FILE OUT_DIR
# Environment: DEVICE (cuda), VIT_SAMPLES (2000), GPT2_SAMPLES (300 windows = 307,200 tokens,
# enough to fill the K × 256 = 262,144-row reservoir), ITERS (2).
set -euo pipefail
text=${1:?usage: calibration-rss.sh TEXT_FILE OUT_DIR}
out=${2:?usage: calibration-rss.sh TEXT_FILE OUT_DIR}
device=${DEVICE:-cuda}
iters=${ITERS:-2}
mkdir -p "$out"
# ru_maxrss of the child: its peak resident set, in KiB on Linux.
peak() {
  python3 - "$@" <<'PY'
import resource, subprocess, sys, time
t0 = time.time()
rc = subprocess.run(sys.argv[1:]).returncode
kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(f"peak_rss_gib={kib / 2**20:.2f} wall_s={time.time() - t0:.0f} rc={rc}")
sys.exit(rc)
PY
}
echo '{"model_type": "vit", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "image_size": 224, "patch_size": 16, "num_channels": 3, "num_labels": 10}' >"$out/vit-b16.json"
echo '{"model_type": "gpt2", "n_embd": 1024, "n_layer": 24, "n_head": 16, "n_positions": 1024, "vocab_size": 50257}' >"$out/gpt2-medium.json"
astra-train init --model-config "$out/vit-b16.json" --out "$out/vit-b16"
astra-train init --model-config "$out/gpt2-medium.json" --out "$out/gpt2-medium"
{
  echo "vit-b16 $(peak astra-train calibrate --model "$out/vit-b16" --data fake:2300x224 --samples "${VIT_SAMPLES:-2000}" \
    --groups 32 --k 1024 --iters "$iters" --device "$device" --out "$out/vit-b16-cb.safetensors")"
  echo "gpt2-medium $(peak astra-train calibrate --model "$out/gpt2-medium" --data "text:$text" --context 1024 \
    --samples "${GPT2_SAMPLES:-300}" --groups 32 --k 1024 --iters "$iters" --device "$device" --out "$out/gpt2-medium-cb.safetensors")"
} | tee "$out/peaks.txt"
