#!/usr/bin/env bash
# Real multi-device latency (issue 8): the 12×768 ViT encoder (random weights, patch 16) at
# T = 256 (256² images) and T = 1024 (512²), one image per request, run by `astra-eval distributed`
# as separate worker processes, each in its own network namespace behind a kernel-shaped uplink
# (scripts/netem.sh), exchanging real bytes over TCP: single device, SP (fp32 all-gather) and
# ASTRA G ∈ {1, 16, 32} (K = 1024) at 10, 50 and 100 Mbit/s. With GPT2_TOKENS (e.g. 1024) also
# GPT-2 small prefill (random weights, causal: indices flow to later devices only; the last device
# returns the next-token logits). With LLAMA_TOKENS (e.g. 1024) also a Llama-shaped decoder of the
# same size (12×768, 12 query heads sharing 4 key/value heads, SwiGLU 2048, RoPE; random weights;
# ASTRA sends key and value indices: two codebooks of width 256 per block). Every distributed run also writes its measured per-block compute
# as an astra-sim trace, and astra-sim predicts that run's latency at the link rate (alpha-beta,
# direct collectives, eager sends overlapping compute that does not need them — the runtime sends
# from a thread per peer —, bandwidth = rate × TCP payload share 0.936 as in
# results/sim-vs-live.md; and the paper's model). Needs root (namespaces, tc).
#   scripts/bench/distributed-real.sh OUT_DIR
# Environment: DEVICES (2), THREADS per worker (1; single device gets the same), RUNS (3, median),
# TOKENS ("256 1024"), GPT2_TOKENS (none), LLAMA_TOKENS (none), MBPS ("10 50 100"), VQ_GROUPS ("1 16 32"; bash reserves
# GROUPS). Writes OUT_DIR/table.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: distributed-real.sh OUT_DIR}
n=${DEVICES:-2}
threads=${THREADS:-1}
runs=${RUNS:-3}
read -r -a token_list <<<"${TOKENS:-256 1024}"
read -r -a mbps_list <<<"${MBPS:-10 50 100}"
read -r -a group_list <<<"${VQ_GROUPS:-1 16 32}"
read -r -a gpt2_tokens <<<"${GPT2_TOKENS:-}"
read -r -a llama_tokens <<<"${LLAMA_TOKENS:-}"
bin=target/release
py=${PYTHON:-.venv/bin/python}
mkdir -p "$out"
[[ $(id -u) == 0 ]] || { echo "distributed-real.sh: needs root for shaped links (network namespaces, tc)" >&2; exit 1; }
cargo build --release -q -p astra-train -p astra-eval -p astra-sim

for t in "${token_list[@]}"; do
  side=$(python3 -c "import math; s=int(math.isqrt($t)); assert s*s==$t, 'T must be a square'; print(s*16)")
  m="$out/vit-t$t"
  if [[ ! -s $m/model.safetensors ]]; then
    cat >"$out/vit-t$t.json" <<EOF
{"architectures": ["ViTForImageClassification"], "model_type": "vit", "hidden_size": 768,
 "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
 "hidden_act": "gelu", "layer_norm_eps": 1e-12, "image_size": $side, "patch_size": 16,
 "num_channels": 3, "qkv_bias": true, "num_labels": 1000}
EOF
    $bin/astra-train init --model-config "$out/vit-t$t.json" --out "$m"
  fi
  samples=$(((2048 + t - 1) / t)) # ≥ 2 rows per codeword
  for g in "${group_list[@]}"; do
    # Codebooks of a random model on random images: right shape and bits, meaningless codewords
    # (latency does not depend on them).
    [[ -s $m/cb-g$g.safetensors ]] ||
      $bin/astra-train calibrate --model "$m" --data "fake:$samples" --samples "$samples" --groups "$g" --k 1024 \
        --iters 2 --noise none --out "$m/cb-g$g.safetensors" >"$m/cb-g$g.log" 2>&1 ||
      { echo "calibrate failed: $m/cb-g$g.log" >&2; tail -3 "$m/cb-g$g.log" >&2; exit 1; }
  done
  $py -c "import numpy as np; np.save('$m/x.npy', np.random.default_rng(0).standard_normal((1, 3, $side, $side)).astype(np.float32))"
done

# Random words as the calibration corpus of the decoders (the codewords do not matter for latency).
if [[ ${#gpt2_tokens[@]} -gt 0 || ${#llama_tokens[@]} -gt 0 ]]; then
  [[ -s $out/words.txt ]] || $py -c "
import numpy as np
w = 'the of and to in a is was for on as with by he at from his it an are were which'.split()
r = np.random.default_rng(0)
open('$out/words.txt', 'w').write(' '.join(r.choice(w, 200000)))"
fi
# decoder PREFIX T CONFIG_JSON: a random decoder of that config, its codebooks and its input.
decoder() {
  local m=$out/$1-t$2 t=$2 g
  if [[ ! -s $m/model.safetensors ]]; then
    echo "$3" >"$out/$1-t$t.json"
    $bin/astra-train init --model-config "$out/$1-t$t.json" --out "$m"
  fi
  local samples=$(((2048 + t - 1) / t))
  for g in "${group_list[@]}"; do
    [[ -s $m/cb-g$g.safetensors ]] ||
      $bin/astra-train calibrate --model "$m" --data "text:$out/words.txt" --context "$t" --samples "$samples" \
        --groups "$g" --k 1024 --iters 2 --noise none --out "$m/cb-g$g.safetensors" >"$m/cb-g$g.log" 2>&1 ||
      { echo "calibrate failed: $m/cb-g$g.log" >&2; tail -3 "$m/cb-g$g.log" >&2; exit 1; }
  done
  $py -c "import numpy as np; np.save('$m/x.npy', np.random.default_rng(0).integers(0, 50257, (1, $t)).astype(np.int64))"
}
for t in "${gpt2_tokens[@]}"; do
  decoder gpt2 "$t" '{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257,
 "n_positions": '"$t"', "n_embd": 768, "n_layer": 12, "n_head": 12, "activation_function": "gelu_new",
 "layer_norm_epsilon": 1e-5}'
done
for t in "${llama_tokens[@]}"; do
  decoder llama "$t" '{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 50257,
 "max_position_embeddings": '"$t"', "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
 "num_key_value_heads": 4, "intermediate_size": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}'
done

common=(--threads "$threads" --runs "$runs" --warmup 1 --timeout-ms 60000)
run() { # NAME ARGS...: one measured configuration, skipped when its summary exists
  local name=$1; shift
  [[ -s $out/$name.json ]] && return 0
  echo "== $name: astra-eval distributed $*"
  $bin/astra-eval distributed "$@" "${common[@]}" --json "$out/$name.json" --out "$out/$name.npy" | tee "$out/$name.log"
}
# measure PREFIX MODEL: every configuration of one model (run names PREFIX-single, PREFIX-rR-sp, …).
measure() {
  local p=$1 m=$2 r g
  run "$p-single" --model "$m" --mode sp --devices 1 --input "$m/x.npy"
  for r in "${mbps_list[@]}"; do
    run "$p-r$r-sp" --model "$m" --mode sp --devices "$n" --links "$r" --input "$m/x.npy" --trace "$out/$p-r$r-sp.trace.json"
    for g in "${group_list[@]}"; do
      run "$p-r$r-g$g" --model "$m" --codebooks "$m/cb-g$g.safetensors" --devices "$n" --links "$r" \
        --input "$m/x.npy" --trace "$out/$p-r$r-g$g.trace.json"
    done
  done
}
for t in "${token_list[@]}"; do measure "t$t" "$out/vit-t$t"; done
for t in "${gpt2_tokens[@]}"; do measure "gpt2-t$t" "$out/gpt2-t$t"; done
for t in "${llama_tokens[@]}"; do measure "llama-t$t" "$out/llama-t$t"; done

# Predictions of each measured run by astra-sim, from its own trace.
predict() { # PREFIX T
  local p=$1 t=$2 r meth name sim_method eff
  for r in "${mbps_list[@]}"; do
    for meth in sp "${group_list[@]/#/g}"; do
      name="$p-r$r-$meth"
      sim_method=$([[ $meth == sp ]] && echo sp || echo "astra-$meth")
      eff=$(python3 -c "print($r * 1448 / (1514 + 33))")
      $bin/astra-sim sweep --trace "$out/$name.trace.json" --methods "$sim_method" --devices "$n" --tokens "$t" \
        --network alpha-beta --alpha-ms 0.05 --algorithm direct --overlap true --mbps "$eff" --out "$out/$name.ab.csv" 2>/dev/null
      $bin/astra-sim sweep --trace "$out/$name.trace.json" --methods "$sim_method" --devices "$n" --tokens "$t" \
        --network paper --mbps "$r" --out "$out/$name.paper.csv" 2>/dev/null
    done
  done
}
for t in "${token_list[@]}"; do predict "t$t" "$t"; done
for t in "${gpt2_tokens[@]}"; do predict "gpt2-t$t" "$t"; done
for t in "${llama_tokens[@]}"; do predict "llama-t$t" "$t"; done

{
  if [[ ${#token_list[@]} -gt 0 ]]; then
    echo "## ViT encoder (12×768), classification"
    echo
    python3 scripts/bench/distributed_table.py "$out" t "$n" "$threads" "${token_list[*]}" "${mbps_list[*]}" "${group_list[*]}"
  fi
  if [[ ${#llama_tokens[@]} -gt 0 ]]; then
    echo
    echo "## Llama-shaped decoder (12×768, GQA 12/4 heads), prefill: key/value indices exchanged"
    echo
    python3 scripts/bench/distributed_table.py "$out" llama-t "$n" "$threads" "${llama_tokens[*]}" "${mbps_list[*]}" "${group_list[*]}"
  fi
  if [[ ${#gpt2_tokens[@]} -gt 0 ]]; then
    echo
    echo "## GPT-2 small (12×768), prefill: next-token logits from the last device"
    echo
    python3 scripts/bench/distributed_table.py "$out" gpt2-t "$n" "$threads" "${gpt2_tokens[*]}" "${mbps_list[*]}" "${group_list[*]}"
  fi
} >"$out/table.md"
cat "$out/table.md"
# Every run against its prediction (the figure results/distributed-real.md shows).
$bin/astra-sim plot-measured --dir "$out" --out "$out/measured-vs-predicted.png" \
  --title "Real runs at N = $n against astra-sim's prediction"
