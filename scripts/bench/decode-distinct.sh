#!/usr/bin/env bash
# Decode rate after an ASTRA prefill with the decoding device's cache holding the distinct remote
# codewords and their counts (the default on the CPU) against every remote token's indices
# (ASTRA_DISTINCT_CODEWORDS=off): GPT-2 small shape (12×768, random weights, codebooks calibrated
# on random words, G = 1, K = 1024), prompt T tokens split over N devices, in process, rounds
# alternating on and off. Writes OUT_DIR/table.md.
#   scripts/bench/decode-distinct.sh OUT_DIR
# Environment: T (1024), N (4), NEW (32 decode tokens), ROUNDS (2), THREADS (libtorch threads, 2).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: decode-distinct.sh OUT_DIR}
t=${T:-1024} n=${N:-4} new=${NEW:-32} rounds=${ROUNDS:-2}
export OMP_NUM_THREADS=${THREADS:-2}
bin=${BIN:-target/release}
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
[[ $bin != target/release ]] || cargo build --release -q -p astra-train -p astra-eval
m=$out/gpt2
[[ -s $out/words.txt ]] || $py -c "
import numpy as np
w = 'the of and to in a is was for on as with by he at from his it an are were which'.split()
open('$out/words.txt', 'w').write(' '.join(np.random.default_rng(0).choice(w, 200000)))"
if [[ ! -s $m/model.safetensors ]]; then
  echo '{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257,
 "n_positions": '"$((t + new))"', "n_embd": 768, "n_layer": 12, "n_head": 12, "activation_function": "gelu_new",
 "layer_norm_epsilon": 1e-5}' >"$out/gpt2.json"
  $bin/astra-train init --model-config "$out/gpt2.json" --out "$m" >/dev/null
fi
[[ -s $m/cb-g1.safetensors ]] ||
  $bin/astra-train calibrate --model "$m" --data "text:$out/words.txt" --context "$t" --samples 2 --groups 1 \
    --k 1024 --iters 2 --noise none --out "$m/cb-g1.safetensors" >"$m/cb-g1.log" 2>&1
$py -c "import numpy as np; np.save('$out/ids.npy', np.random.default_rng(0).integers(0, 50257, (1, $t)).astype(np.int64))"
for r in $(seq 1 "$rounds"); do
  for mode in on off; do
    ASTRA_DISTINCT_CODEWORDS=$mode $bin/astra-eval generate --model "$m" --input "$out/ids.npy" --devices "$n" \
      --codebooks "$m/cb-g1.safetensors" --max-new-tokens "$new" --json "$out/r$r-$mode.json" \
      --out "$out/r$r-$mode.npy" | tail -1
  done
done
$py - "$out" "$rounds" "$t" "$n" "$new" "$OMP_NUM_THREADS" >"$out/table.md" <<'PY'
import json, sys
out, rounds, t, n, new, threads = sys.argv[1], int(sys.argv[2]), *sys.argv[3:]
print(f"GPT-2 small shape, prompt {t} tokens over N = {n} devices, {new} new tokens, G = 1, K = 1024, "
      f"{threads} libtorch thread(s), in process.\n")
print("| round | distinct codewords | decode (tokens/s) | first token (ms) | remote keys a decode step (mean over blocks) | remote cache (B) |")
print("|---:|---|---:|---:|---:|---:|")
for r in range(1, rounds + 1):
    for mode in ("on", "off"):
        s = json.load(open(f"{out}/r{r}-{mode}.json"))
        keys = s.get("remote_keys") or [0]
        print(f"| {r} | {mode} | {s['decode_tokens_per_s']:.1f} | {s['time_to_first_token_ms']:.0f} "
              f"| {sum(keys) / len(keys):.0f} | {s['cache_bytes']['remote']} |")
PY
cat "$out/table.md"
