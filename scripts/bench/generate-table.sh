#!/usr/bin/env bash
# Generation after an ASTRA prefill, on this CPU (issue 21's measurements):
#  1. the decoding device's cache against the paper's App. G formula, measured from the allocated
#     cache of a model with Llama-3-8B's key/value shape (8 key/value heads × 128 = 1024 wide, 32
#     query heads; 2 blocks suffice, the cache scales per block) at T = 1024, N = 4, G ∈ {1, 16, 32},
#     K = 1024;
#  2. time to first token (the prefill, in process) and decode rate of a 12×768 Llama-shaped model
#     (GQA 12/4) with its prompt split over N = 2 against one device, same cache code.
# Random weights and codebooks calibrated on random words: sizes and speed do not depend on them.
#   scripts/bench/generate-table.sh OUT_DIR            (writes OUT_DIR/table.md)
# Environment: NEW (64 decode tokens), THREADS (libtorch threads, 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: generate-table.sh OUT_DIR}
new=${NEW:-64}
export OMP_NUM_THREADS=${THREADS:-2}
bin=target/release
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
cargo build --release -q -p astra-train -p astra-eval
[[ -s $out/words.txt ]] || $py -c "
import numpy as np
w = 'the of and to in a is was for on as with by he at from his it an are were which'.split()
open('$out/words.txt', 'w').write(' '.join(np.random.default_rng(0).choice(w, 200000)))"

model() { # NAME CONFIG_JSON: a random model and its codebooks for G in 1 16 32 (K = 1024)
  local m=$out/$1 g
  [[ -s $m/model.safetensors ]] || { echo "$2" >"$out/$1.json"; $bin/astra-train init --model-config "$out/$1.json" --out "$m" >/dev/null; }
  for g in 1 16 32; do
    [[ -s $m/cb-g$g.safetensors ]] ||
      $bin/astra-train calibrate --model "$m" --data "text:$out/words.txt" --context 1024 --samples 2 --groups "$g" \
        --k 1024 --iters 2 --noise none --out "$m/cb-g$g.safetensors" >"$m/cb-g$g.log" 2>&1
  done
}
model kv8b '{"model_type": "llama", "vocab_size": 50257, "max_position_embeddings": 1100, "hidden_size": 512,
 "num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
 "intermediate_size": 1024, "rope_theta": 500000.0}'
model llama768 '{"model_type": "llama", "vocab_size": 50257, "max_position_embeddings": 1100, "hidden_size": 768,
 "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4, "intermediate_size": 2048}'
$py -c "import numpy as np; np.save('$out/ids.npy', np.random.default_rng(0).integers(0, 50257, (1, 1024)).astype(np.int64))"

gen() { # NAME MODEL DEVICES G|- NEW
  local cb=()
  [[ $4 != - ]] && cb=(--codebooks "$out/$2/cb-g$4.safetensors")
  $bin/astra-eval generate --model "$out/$2" --input "$out/ids.npy" --devices "$3" "${cb[@]}" \
    --max-new-tokens "$5" --json "$out/$1.json" --out "$out/$1.npy" 2>&1 | tail -1
}
gen cache-single kv8b 1 - 1
for g in 1 16 32; do gen "cache-g$g" kv8b 4 "$g" 1; done
gen speed-single llama768 1 - "$new"
for g in 1 16 32; do gen "speed-g$g" llama768 2 "$g" "$new"; done
$py scripts/bench/generate_table.py "$out" >"$out/table.md"
cat "$out/table.md"
