#!/usr/bin/env bash
# The paper's GPT-2 perplexity table (ASTRA.md §5) at small scale, on one GPU: a GPT-2 small
# configuration (768 wide, 12 blocks, 12 heads) trained from scratch on each corpus, then codebooks
# (G ∈ {1, 16, 32}) and ASTRA fine-tuning with N = 4 (λ = 1, β = 5e-4).
# Corpora: WikiText-2 (train on its valid split, test on its test split: the train split is not
# available offline) and tiny-shakespeare (first 90% / last 10% of its tokens). Every run holds the
# last 10% of its training windows out, selects its epoch on them and scores that model on the
# test split once (complete.json).
#   scripts/bench/text-tables.sh DATA_DIR OUT_DIR      (DATA_DIR holds wikitext-2/ and tinyshakespeare/)
# Environment: BASE_EPOCHS (8), ASTRA_EPOCHS (3), CONTEXT (256), K (256), JOBS (3), DEVICE (cuda),
# BF16 (--bf16), EXTRA (more training flags, e.g. "--max-train 512" for a smoke test),
# ARCH (gpt2; llama: the same size as a Llama — SwiGLU 2048, 12 query heads sharing KV_HEADS (4)
# key/value heads, RoPE — whose ASTRA quantizes each block's keys and values; runs named llama-*),
# SHAPE (the width/depth flags, default the 768×12 configuration).
set -euo pipefail
data=${1:?usage: text-tables.sh DATA_DIR OUT_DIR}
out=${2:?usage: text-tables.sh DATA_DIR OUT_DIR}
base_epochs=${BASE_EPOCHS:-8}
astra_epochs=${ASTRA_EPOCHS:-3}
ctx=${CONTEXT:-256}
k=${K:-256}
jobs=${JOBS:-3}
device=${DEVICE:-cuda}
bf16=${BF16---bf16}
mkdir -p "$out"
export RAYON_NUM_THREADS=${RAYON_NUM_THREADS:-5} OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# shellcheck source=../lib/runs.sh
source "$(dirname "$0")/../lib/runs.sh"

declare -A spec=(
  [wikitext2]="text:$data/wikitext-2/valid.txt,$data/wikitext-2/test.txt"
  [shakespeare]="text:$data/tinyshakespeare/input.txt"
)
common="--batch 16 --context $ctx --device $device $bf16 ${EXTRA:-}"
case ${ARCH:-gpt2} in
  gpt2) p=lm shape=${SHAPE:-"--hidden 768 --layers 12 --heads 12 --mlp 3072"} ;;
  llama) p=llama shape="${SHAPE:-"--hidden 768 --layers 12 --heads 12 --mlp 2048"} --arch llama --kv-heads ${KV_HEADS:-4}" ;;
  *) echo "text-tables.sh: ARCH must be gpt2 or llama" >&2; exit 2 ;;
esac
for c in wikitext2 shakespeare; do
  echo "run $p-$c astra-train finetune --data ${spec[$c]} $common --epochs $base_epochs --lr 3e-4 --warmup-steps 100 $shape --seed 42 --out $out/$p-$c"
done | xargs -P "$jobs" -I{} bash -c '{}'
for c in wikitext2 shakespeare; do
  for g in 1 16 32; do
    echo "run ${p}cb-$c-g$g astra-train calibrate --model $out/$p-$c --data ${spec[$c]} --context $ctx --samples 100 --groups $g --k $k --iters 20 --device $device --out $out/${p}cb-$c-g$g.safetensors"
  done
done | xargs -P "$jobs" -I{} bash -c '{}'
# The control: the original trained for ASTRA's extra epochs at ASTRA's learning rate, without
# ASTRA, so each ASTRA row compares with a model that saw as much training.
for c in wikitext2 shakespeare; do
  echo "run ${p}more-$c astra-train finetune --data ${spec[$c]} $common --epochs $astra_epochs --lr 1e-4 --warmup-steps 50 --init $out/$p-$c --seed 42 --out $out/${p}more-$c"
  for g in 1 16 32; do
    echo "run ${p}astra-$c-g$g astra-train astra --data ${spec[$c]} $common --epochs $astra_epochs --lr 1e-4 --warmup-steps 50 --init $out/$p-$c --codebooks $out/${p}cb-$c-g$g.safetensors --devices 4 --seed 42 --out $out/${p}astra-$c-g$g"
  done
done | xargs -P "$jobs" -I{} bash -c '{}'
echo "all runs finished in $out"
