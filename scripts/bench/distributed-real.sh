#!/usr/bin/env bash
# Real multi-device latency (issues 8 and 22): the 12×768 ViT encoder (random weights, patch 16) at
# T = 256 (256² images) and T = 1024 (512²), one image per request, run by `astra-eval distributed`
# as separate worker processes exchanging real bytes: single device, SP (fp32 embeddings) and
# ASTRA G ∈ {1, 16, 32} (K = 1024) over TCP, and ASTRA over UDP multicast (each block's indices on
# the wire once for every peer; MULTICAST_GROUPS), at each link rate, for each N in DEVICES. Links:
# each worker's uplink shaped by the kernel (tc in network namespaces, scripts/netem.sh; root) or
# by the worker itself in user space (SHAPER=user: runs anywhere). With GPT2_TOKENS (e.g. 1024)
# also GPT-2 small prefill (random weights, causal: indices flow to later devices only; the last
# device returns the next-token logits). With LLAMA_TOKENS (e.g. 1024) also a Llama-shaped
# decoder of the same size (12×768, 12 query heads sharing 4 key/value heads, SwiGLU 2048, RoPE;
# random weights; ASTRA sends key and value indices: two codebooks of width 256 per block). Every
# distributed run also writes its measured per-block compute as an astra-sim trace (eager sends
# per peer over TCP, one multicast per device and block otherwise), and astra-sim predicts that
# run's latency at the link rate (scripts/bench/sim_predict.py: alpha-beta with each message's
# latency as the run measured it, α = 0.05 ms where it did not, eager sends overlapping compute
# that does not need them, the shaper's 3,028-byte token bucket, bandwidth = rate × the payload
# share of what the shaper counts: TCP behind the kernel 1448/1547 (segments and the ACKs sharing
# the uplink, results/sim-vs-live.md), user space 1448/1514 (segments), multicast 1448/1514
# (datagrams); and the paper's model).
#   scripts/bench/distributed-real.sh OUT_DIR
# Environment: DEVICES ("2"; e.g. "2 4 8"), CORES (this machine's; each worker gets CORES/N
# libtorch threads and the single device of that N the same) or THREADS (fixed per worker),
# RUNS (3, median) and WARMUP (1), SP_RUNS/SP_WARMUP (RUNS/WARMUP), TOKENS ("256 1024"),
# GPT2_TOKENS, LLAMA_TOKENS (none), MBPS ("10 50 100"), SP_MBPS (MBPS), VQ_GROUPS ("1 16 32"; bash
# reserves GROUPS), MULTICAST_GROUPS ("16 32"; "" for none), SHAPER (kernel as root, else user),
# WORKER_DEVICE (cpu; cuda puts every worker on the one GPU), MPS (0; 1 with WORKER_DEVICE=cuda
# runs the workers under a private CUDA MPS control daemon started for the runs and quit after, so
# their kernels share the GPU at once instead of time-slicing it; needs nvidia-cuda-mps-control),
# ASTRA_CUDA_HOST_WAIT (unset; spin, yield or block: how GPU workers' host threads wait for the
# GPU, passed on to every worker and written to OUT_DIR/host-wait.txt for the tables),
# BIN (target/release, built here),
# PIN (0; 1 pins each worker, and the single device, to THREADS cores of its own: --pin-cores),
# PYTHON, MEASURE (1; 0 only predicts and tabulates the runs OUT_DIR holds, e.g. after a cut run),
# SINGLE_BESIDE (0; 1, CPU workers: also the single device as the workers run, N copies of it at
# once, each on THREADS cores of its own, PREFIX-nN-single-beside.json: one box standing in for N
# devices shares its clock and memory among them, so a device computes slower while the others
# work; the tables then give the speedup over this single device too),
# IDLE_SPINNERS (0; 1 keeps every core of the box busy at the lowest priority, SCHED_IDLE, while
# the runs are measured: a worker's cores then never halt while it waits, which on a VM guest
# separates the cost of waking a halted vCPU from everything else; the runs themselves preempt the
# spinners at once).
# Writes OUT_DIR/table.md.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=${1:?usage: distributed-real.sh OUT_DIR}
read -r -a device_list <<<"${DEVICES:-2}"
cores=${CORES:-$(nproc)}
runs=${RUNS:-3}
warmup=${WARMUP:-1}
read -r -a token_list <<<"${TOKENS:-256 1024}"
read -r -a mbps_list <<<"${MBPS:-10 50 100}"
read -r -a sp_mbps_list <<<"${SP_MBPS:-${MBPS:-10 50 100}}"
read -r -a group_list <<<"${VQ_GROUPS:-1 16 32}"
read -r -a mc_list <<<"${MULTICAST_GROUPS-16 32}"
read -r -a gpt2_tokens <<<"${GPT2_TOKENS:-}"
read -r -a llama_tokens <<<"${LLAMA_TOKENS:-}"
shaper=${SHAPER:-$([[ $(id -u) == 0 ]] && echo kernel || echo user)}
worker_device=${WORKER_DEVICE:-cpu}
pin_args=()
[[ ${PIN:-0} == 1 ]] && pin_args=(--pin-cores)
py=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
mkdir -p "$out"
case $shaper in
  kernel) [[ $(id -u) == 0 ]] || { echo "distributed-real.sh: SHAPER=kernel needs root (network namespaces, tc); use SHAPER=user" >&2; exit 1; } ;;
  user) ;;
  *) echo "distributed-real.sh: SHAPER must be kernel or user, got '$shaper'" >&2; exit 1 ;;
esac
if [[ ${MPS:-0} == 1 ]]; then
  [[ $worker_device == cuda* ]] || { echo "distributed-real.sh: MPS=1 needs WORKER_DEVICE=cuda" >&2; exit 1; }
  [[ ${MEASURE:-1} == 0 ]] || command -v nvidia-cuda-mps-control >/dev/null ||
    { echo "distributed-real.sh: MPS=1 needs nvidia-cuda-mps-control (the driver's utilities)" >&2; exit 1; }
fi
if [[ -z ${BIN:-} ]]; then
  cargo build --release -q -p astra-train -p astra-eval -p astra-sim
fi
bin=${BIN:-target/release}
threads_for() { echo "${THREADS:-$(((cores / $1) > 0 ? cores / $1 : 1))}"; }

prepare_models() {
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

}
# Models, codebooks and inputs (not needed to predict and tabulate runs already made).
[[ ${MEASURE:-1} == 0 ]] || prepare_models

cleanup=()
trap 'for c in "${cleanup[@]}"; do eval "$c"; done' EXIT
if [[ ${MPS:-0} == 1 && ${MEASURE:-1} != 0 ]]; then
  # A daemon of our own (its pipe and log folders), which the workers find through the environment.
  CUDA_MPS_PIPE_DIRECTORY=$(mktemp -d /tmp/astra-mps-pipe.XXXXXX)
  CUDA_MPS_LOG_DIRECTORY=$(mktemp -d /tmp/astra-mps-log.XXXXXX)
  export CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d || { echo "distributed-real.sh: the MPS control daemon did not start" >&2; exit 1; }
  cleanup+=('echo quit | nvidia-cuda-mps-control')
  echo "CUDA MPS control daemon for these runs (pipes in $CUDA_MPS_PIPE_DIRECTORY)" >"$out/mps.txt"
fi
if [[ -n ${ASTRA_CUDA_HOST_WAIT:-} && $worker_device == cuda* && ${MEASURE:-1} != 0 ]]; then
  echo "$ASTRA_CUDA_HOST_WAIT" >"$out/host-wait.txt"
fi
if [[ ${IDLE_SPINNERS:-0} == 1 && ${MEASURE:-1} != 0 ]]; then
  command -v chrt >/dev/null || { echo "distributed-real.sh: IDLE_SPINNERS=1 needs chrt (util-linux)" >&2; exit 1; }
  spinners=()
  for c in $(python3 -c "import os; print(*sorted(os.sched_getaffinity(0)))"); do
    taskset -c "$c" chrt -i 0 bash -c 'while :; do :; done' &
    spinners+=($!)
  done
  cleanup+=('kill "${spinners[@]}" 2>/dev/null')
  echo "idle spinners on ${#spinners[@]} cores (SCHED_IDLE)"
fi
run() { # NAME N ARGS...: one measured configuration, skipped when its summary exists
  local name=$1 n=$2 r=$runs w=$warmup; shift 2
  [[ -s $out/$name.json || ${MEASURE:-1} == 0 ]] && return 0
  [[ $name == *-sp ]] && r=${SP_RUNS:-$runs} && w=${SP_WARMUP:-$warmup}
  echo "== $name: astra-eval distributed $*"
  $bin/astra-eval distributed "$@" --threads "$(threads_for "$n")" "${pin_args[@]}" --device "$worker_device" --runs "$r" --warmup "$w" \
    --timeout-ms 120000 --json "$out/$name.json" --out "$out/$name.npy" | tee "$out/$name.log"
}
# single_beside PREFIX N MODEL: N copies of the single device started at once, copy c on cores
# [c·THREADS, (c+1)·THREADS) of the allowed ones, each with two more timed runs than the others so
# that their timed runs overlap; PREFIX-nN-single-beside.json holds the median of their medians.
single_beside() {
  local p=$1 n=$2 m=$3 th c cpus pids=() allowed
  [[ -s $out/$p-single-beside.json || ${MEASURE:-1} == 0 ]] && return 0
  th=$(threads_for "$n")
  read -r -a allowed < <(python3 -c "import os; print(*sorted(os.sched_getaffinity(0)))")
  ((${#allowed[@]} >= n * th)) || { echo "distributed-real.sh: SINGLE_BESIDE=1 needs $n × $th cores, this process may use ${#allowed[@]}" >&2; exit 1; }
  echo "== $p-single-beside: $n copies of the single device at once, $th thread(s) each"
  for ((c = 0; c < n; c++)); do
    cpus=$(IFS=,; echo "${allowed[*]:c*th:th}")
    taskset -c "$cpus" "$bin/astra-eval" distributed --model "$m" --mode sp --devices 1 --input "$m/x.npy" \
      --threads "$th" "${pin_args[@]}" --device "$worker_device" --runs "$((runs + 2))" --warmup "$warmup" \
      --timeout-ms 120000 --json "$out/$p-single-beside-$c.json" --out "$out/$p-single-beside-$c.npy" \
      >"$out/$p-single-beside-$c.log" 2>&1 &
    pids+=($!)
  done
  for c in "${!pids[@]}"; do
    wait "${pids[c]}" || { echo "distributed-real.sh: copy $c failed: $out/$p-single-beside-$c.log" >&2; tail -3 "$out/$p-single-beside-$c.log" >&2; exit 1; }
  done
  python3 - "$out" "$p" "$n" <<'PY' | tee "$out/$p-single-beside.log"
import json, statistics, sys
from pathlib import Path
out, p, n = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
copies = [json.loads((out / f"{p}-single-beside-{c}.json").read_text()) for c in range(n)]
medians = [c["median_ms"] for c in copies]
summary = {"mode": "single-beside", "copies": n, "copies_median_ms": medians,
           "median_ms": statistics.median(medians),
           "compute_ms": [max(c["compute_ms"]) for c in copies],
           "pinned_cores": [c.get("pinned_cores") for c in copies]}
tmp = out / f"{p}-single-beside.json.part"
tmp.write_text(json.dumps(summary, indent=1))
tmp.rename(out / f"{p}-single-beside.json")
print(f"{n} copies of the single device at once: medians {', '.join(f'{m:.1f}' for m in medians)} ms")
PY
}
# measure PREFIX MODEL N: every configuration of one model at N devices (runs PREFIX-nN-single,
# PREFIX-nN-rR-sp, PREFIX-nN-rR-gG, PREFIX-nN-rR-gG-mc).
measure() {
  local p=$1-n$3 m=$2 n=$3 r g
  local shaped=(--devices "$n" --shaper "$shaper" --input "$m/x.npy")
  run "$p-single" "$n" --model "$m" --mode sp --devices 1 --input "$m/x.npy"
  if [[ ${SINGLE_BESIDE:-0} == 1 && $n -gt 1 ]]; then
    [[ $worker_device == cpu ]] || { echo "distributed-real.sh: SINGLE_BESIDE=1 is for CPU workers" >&2; exit 1; }
    single_beside "$p" "$n" "$m"
  fi
  for r in "${sp_mbps_list[@]}"; do
    run "$p-r$r-sp" "$n" --model "$m" --mode sp --links "$r" "${shaped[@]}" --trace "$out/$p-r$r-sp.trace.json"
  done
  for r in "${mbps_list[@]}"; do
    for g in "${group_list[@]}"; do
      run "$p-r$r-g$g" "$n" --model "$m" --codebooks "$m/cb-g$g.safetensors" --links "$r" "${shaped[@]}" \
        --trace "$out/$p-r$r-g$g.trace.json"
    done
    for g in "${mc_list[@]}"; do
      run "$p-r$r-g$g-mc" "$n" --model "$m" --codebooks "$m/cb-g$g.safetensors" --links "$r" "${shaped[@]}" \
        --transport multicast --trace "$out/$p-r$r-g$g-mc.trace.json"
    done
  done
}
for n in "${device_list[@]}"; do
  for t in "${token_list[@]}"; do measure "t$t" "$out/vit-t$t" "$n"; done
  for t in "${gpt2_tokens[@]}"; do measure "gpt2-t$t" "$out/gpt2-t$t" "$n"; done
  for t in "${llama_tokens[@]}"; do measure "llama-t$t" "$out/llama-t$t" "$n"; done
done

# Predictions of each measured run by astra-sim, from its own trace (scripts/bench/sim_predict.py
# says how: the settings above).
predict() { # PREFIX N
  local p=$1-n$2 name
  for name in $(cd "$out" && ls "$p"-r*.trace.json 2>/dev/null | sed 's/\.trace\.json$//'); do
    [[ -s $out/$name.ab.csv ]] && continue
    python3 scripts/bench/sim_predict.py "$bin/astra-sim" "$out" "$name"
  done
}
for n in "${device_list[@]}"; do
  for t in "${token_list[@]}"; do predict "t$t" "$n"; done
  for t in "${gpt2_tokens[@]}"; do predict "gpt2-t$t" "$n"; done
  for t in "${llama_tokens[@]}"; do predict "llama-t$t" "$n"; done
done

table() { # TITLE PREFIX TOKENS...
  local title=$1 prefix=$2 n; shift 2
  [[ $# -gt 0 ]] || return 0
  echo "## $title"
  for n in "${device_list[@]}"; do
    echo
    python3 scripts/bench/distributed_table.py "$out" "$prefix" "$n" "$(threads_for "$n")" "$*" \
      "${mbps_list[*]}" "${sp_mbps_list[*]}" "${group_list[*]}" "${mc_list[*]}" "$shaper" "$worker_device"
  done
  echo
}
{
  table "ViT encoder (12×768), classification" t "${token_list[@]}"
  table "Llama-shaped decoder (12×768, GQA 12/4 heads), prefill: key/value indices exchanged" llama-t "${llama_tokens[@]}"
  table "GPT-2 small (12×768), prefill: next-token logits from the last device" gpt2-t "${gpt2_tokens[@]}"
} >"$out/table.md"
cat "$out/table.md"
# Every run against its prediction (the figure results/distributed-real.md shows).
$bin/astra-sim plot-measured --dir "$out" --out "$out/measured-vs-predicted.png" \
  --title "Real runs at N = ${device_list[*]} against astra-sim's prediction"
