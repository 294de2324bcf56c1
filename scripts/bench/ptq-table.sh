#!/usr/bin/env bash
# Table 5 analogue: ASTRA combined with post-training weight quantization. For each model (the
# original and its ASTRA fine-tunes, with their codebooks), fp32 weights and `astra-train
# quantize-weights` at 8 and 4 bits, test accuracy on one device (the original) or on N devices with
# VQ on (ASTRA), through `astra-eval accuracy`; the 8-bit models also computed in int8
# (`--int8-compute`, fbgemm on the CPU) instead of dequantized.
#   scripts/bench/ptq-table.sh OUT_DIR DATA_SPEC ORIGINAL ASTRA_RUN...   (release binaries in BIN)
# Environment: BIN (target/release), DEVICES (4), GROUP_SIZE (128), DEVICE (cpu), METRIC
# (accuracy, or perplexity for a language model), EXTRA (flags for every evaluation, e.g.
# "--max-test 2000", or "--context 128" for text).
set -euo pipefail
out=${1:?usage: ptq-table.sh OUT_DIR DATA_SPEC ORIGINAL ASTRA_RUN...}
data=${2:?data spec}
shift 2
bin=${BIN:-target/release}
n=${DEVICES:-4}
mkdir -p "$out"
for model in "$@"; do
  name=$(basename "$model")
  # 8i: the 8-bit folder computed in int8 (--int8-compute: fbgemm on the CPU, activations
  # quantized per tensor) rather than dequantized to fp32.
  for bits in 32 8 8i 4; do
    m=$model flags=()
    if [[ $bits != 32 ]]; then
      m=$out/$name-w${bits%i}
      [[ -d $m ]] || "$bin/astra-train" quantize-weights --model "$model" --bits "${bits%i}" \
        --group-size "${GROUP_SIZE:-128}" --out "$m"
    fi
    [[ $bits == 8i ]] && flags=(--int8-compute)
    setting=(--devices "$n" --vq on)
    [[ -f $model/codebooks.safetensors ]] || setting=(--devices 1 --vq off)
    "$bin/astra-eval" "${METRIC:-accuracy}" --model "$m" --data "$data" "${setting[@]}" --device "${DEVICE:-cpu}" \
      "${flags[@]}" ${EXTRA:-} --json "$out/$name-w$bits.json" --table "$out/$name-w$bits.md" >/dev/null
    echo "$name w$bits done"
  done
done
python3 - "$out" "$@" <<'PY'
import json, os, sys
out, models = sys.argv[1], sys.argv[2:]
print("| model | fp32 weights | 8-bit weights | 8-bit, int8 compute | 4-bit weights |")
print("|---|---:|---:|---:|---:|")
for m in models:
    name = os.path.basename(m)
    cells = []
    for bits in ("32", "8", "8i", "4"):
        rows = json.load(open(os.path.join(out, f"{name}-w{bits}.json")))["rows"]
        cells.append(f"{rows[-1]['value']:.2f}")
    print(f"| {name} | " + " | ".join(cells) + " |")
PY
