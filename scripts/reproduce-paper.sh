#!/usr/bin/env bash
# The paper's full-scale experiments (ASTRA.md §3 recipe, §5 targets) for a GPU box with internet.
# Resumable: every step is skipped when its output exists, and an interrupted training run is
# continued with --resume; run it again after any failure.
#
#   scripts/reproduce-paper.sh                 # everything that has data (ImageNet needs IMAGENET_DIR)
#   STEPS="data cifar" scripts/reproduce-paper.sh
#   scripts/reproduce-paper.sh --rehearse full|tiny [--out DIR]
#
# --rehearse runs every step below, in the same order and through the same commands, on generated
# data (scripts/lib/rehearsal_data.py: CIFAR-100 batches, an ImageNet folder, WikiText-103 raw
# files) with randomly initialised models of the real shapes (full: ViT-B/16 224², GPT-2 small and
# medium at 1024 tokens; on the GPU) or tiny ones (tiny: a CPU in minutes); each training run
# stops after REHEARSAL_STEPS steps (full 120, tiny 2) and each evaluation after a few hundred
# examples (scripts/lib/rehearsal.sh sets it up). It writes DIR/rehearsal.md (default DIR
# results/rehearsal-MODE): per step the wall-clock, throughput, peak host RSS and GPU memory,
# checkpoint and codebook sizes, and the projected wall-clock and GPU-hours of the real recipe
# (scripts/lib/rehearsal_report.py). Every run, rehearsal or not, appends what each command cost
# to OUT/steps.jsonl.
#
# Steps, in the order they run (STEPS, default all: "setup data cifar imagenet text deploy sim
# wikipedia summary"; wikipedia comes last as its training steps repeat the text step's on other
# data, so a rehearsal cut short can still project them):
#   setup     scripts/setup.sh and the release build
#   data      CIFAR-100 (astra-train download, MD5-checked), WikiText-103 raw (zip from
#             $WIKITEXT103_URL, unpacked); ImageNet is never downloaded: IMAGENET_DIR=DIR with
#             DIR/train/<class>/*.JPEG and DIR/val/<class>/* (val sorted into class folders)
#   cifar     ViT-B/16 from $VIT_INIT (google/vit-base-patch16-224-in21k, via hf-hub) fine-tuned on
#             CIFAR-100 at 224² (the paper's "original"), codebooks per G (k-means on block inputs),
#             ASTRA fine-tuning per G at N = $DEVICES for $CIFAR_EPOCHS (32) epochs, the device-count
#             rows (Table 2: N ∈ $TABLE2_DEVICES at G = 32), accuracy tables
#   imagenet  $IMAGENET_INIT (google/vit-base-patch16-224, already ImageNet-1K fine-tuned) as the
#             original; codebooks, ASTRA per G for $IMAGENET_EPOCHS (4) epochs, accuracy tables
#   text      per GPT-2 in $GPT2_MODELS (openai-community/gpt2, openai-community/gpt2-medium):
#             the pretrained model's WikiText-103 perplexity (its own row, "pretrained"), one epoch
#             of plain fine-tuning on WikiText-103, codebooks, one epoch of ASTRA per G, perplexity
#             tables on the WikiText-103 test split (Table 3's "WikiText-103 fine-tuned" column)
#   deploy    the CIFAR-100 ASTRA model (largest G) and the first GPT-2's exported as HF folders
#             with their codebooks (astra-train export), each run by the multi-process runtime on
#             N = $DEVICES local workers over 10 Mbit/s links shaped in user space (a random image
#             / a random CONTEXT-token prompt; astra-eval distributed --json)
#   sim       the latency study: astra-sim reproduce (speedups, Table 4, Fig 3, figures; no GPU)
#   wikipedia per GPT-2 in $WIKI_GPT2_MODELS (default $GPT2_MODELS): one epoch on $WIKI_DOCS
#             (1,000,000) English Wikipedia articles (the paper's 1M samples; $WIKIPEDIA, default
#             hf:wikimedia/wikipedia/20231101.en from the HF cache — astra-train's parquet: spec, whose seeded split holds out test and
#             validation articles), codebooks, one epoch of ASTRA per G; perplexity on the held-out
#             Wikipedia articles (Table 3's "Wikipedia" column) and, the paper's zero-shot
#             protocol, on WikiText-103's validation split ("WikiText-103 zero-shot" column)
#   summary   $OUT/summary.md listing every table with the commands that made it
#
# Environment: OUT (results/paper), DATA (data), DEVICE (cuda), BIN (target/release), PRECISION
# (--bf16), DEVICES (4), K (1024), VQ_GROUPS ("1 16 32"), BATCH (128), LR (1e-4), CIFAR_BASE_EPOCHS
# (10), CIFAR_EPOCHS (32), IMAGENET_EPOCHS (4), TEXT_EPOCHS (1), CONTEXT (1024), TEXT_BATCH (8),
# TEXT_LR (5e-5), CALIB_SAMPLES (2000), TEXT_CALIB_SAMPLES (CALIB_SAMPLES), IMAGE_SIZE (224), TABLE2_DEVICES ("2 6 8"), EXTRA (flags
# for every training run, e.g. "--max-train 64" for a smoke run), EVAL_EXTRA (flags for every
# evaluation, e.g. "--max-test 64"), IMAGE_EXTRA / TEXT_EXTRA (flags for the image / text training
# runs only), CIFAR100_DIR / WIKITEXT103_DIR (use these instead of downloading), WIKIPEDIA (a
# folder or glob of the parquet shards, or hf:ORG/NAME/CONFIG in the HF cache; never downloaded
# here: `huggingface-cli download --repo-type dataset wikimedia/wikipedia --include '20231101.en/*'`),
# WIKI_DOCS (1000000), WIKI_GPT2_MODELS (the GPT-2s of the wikipedia step; default GPT2_MODELS).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

rehearse=""
while (($#)); do
  case $1 in
    --rehearse) rehearse=${2:?reproduce-paper.sh: --rehearse needs full or tiny}; shift 2 ;;
    --out) OUT=${2:?reproduce-paper.sh: --out needs a folder}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    *) echo "reproduce-paper.sh: unknown argument '$1' (use --rehearse full|tiny and --out DIR; steps via STEPS)" >&2; exit 2 ;;
  esac
done
# The recipe's defaults (a rehearsal projects to these, whatever it runs itself).
recipe_groups="1 16 32" recipe_table2="2 6 8" recipe_samples=2000
recipe_gpt2="openai-community/gpt2 openai-community/gpt2-medium"
if [[ -n $rehearse ]]; then
  # shellcheck source=lib/rehearsal.sh
  source scripts/lib/rehearsal.sh
fi

out=${OUT:-results/paper}
data=${DATA:-data}
device=${DEVICE:-cuda}
bin=${BIN:-target/release}
precision=${PRECISION---bf16}
n=${DEVICES:-4}
k=${K:-1024}
read -r -a groups <<<"${VQ_GROUPS:-$recipe_groups}"
read -r -a table2 <<<"${TABLE2_DEVICES:-$recipe_table2}"
read -r -a gpt2_models <<<"${GPT2_MODELS:-$recipe_gpt2}"
read -r -a wiki_models <<<"${WIKI_GPT2_MODELS:-${gpt2_models[*]}}"
read -r -a steps <<<"${STEPS:-setup data cifar imagenet text deploy sim wikipedia summary}"
batch=${BATCH:-128}
lr=${LR:-1e-4}
image=${IMAGE_SIZE:-224}
samples=${CALIB_SAMPLES:-$recipe_samples}
text_samples=${TEXT_CALIB_SAMPLES:-$samples}
extra=${EXTRA:-}
eval_extra=${EVAL_EXTRA:-}
vit_init=${VIT_INIT:-google/vit-base-patch16-224-in21k}
imagenet_init=${IMAGENET_INIT:-google/vit-base-patch16-224}
wt_url=${WIKITEXT103_URL:-https://wikitext.smerity.com/wikitext-103-raw-v1.zip}
c100=${CIFAR100_DIR:-$data/cifar100}
wt=${WIKITEXT103_DIR:-$data/wikitext-103-raw}
wiki_spec=parquet:${WIKIPEDIA:-hf:wikimedia/wikipedia/20231101.en}:text:max-docs=${WIKI_DOCS:-1000000}
mkdir -p "$out/runs" "$out/codebooks" "$out/tables" "$out/logs"

say() { printf '\n== %s\n' "$*"; }
# meter LABEL CMD...: runs CMD, appending its wall-clock, peak RSS and peak GPU memory to
# $out/steps.jsonl (what the rehearsal report reads; kept for real runs too).
meter() { local label=$1; shift; python3 scripts/lib/step_meter.py "$out/steps.jsonl" "$label" -- "$@"; }
wants() { [[ " ${steps[*]} " == *" $1 "* ]]; }
# The commands that made each output, for the summary.
log_cmd() { printf '%s\n' "$*" >>"$out/commands.txt"; }

# train RUN CMD...: a training run (finetune or astra) into $out/runs/RUN; skipped when finished
# (the trainer writes complete.json after the last epoch), continued with --resume when the folder
# holds an unfinished run.
train() {
  local name=$1 run=$out/runs/$1; shift
  if [[ -s $run/complete.json ]]; then echo "skip: $run (done)"; return 0; fi
  local resume=()
  [[ -d $run ]] && resume=(--resume)
  say "train $run${resume:+ (resuming)}"
  log_cmd "$bin/astra-train $* --out $run"
  meter "train $name" "$bin/astra-train" "$@" --out "$run" "${resume[@]}" $extra $train_extra 2>&1 |
    tee -a "$out/logs/$name.log"
}

# calibrate NAME MODEL DATA GROUPS SAMPLES [flags]: codebooks into $out/codebooks/NAME.safetensors.
calibrate() {
  local name=$1 f=$out/codebooks/$1.safetensors model=$2 spec=$3 g=$4 n=$5; shift 5
  if [[ -s $f ]]; then echo "skip: $f (done)"; return 0; fi
  say "codebooks $f"
  log_cmd "$bin/astra-train calibrate --model $model --data $spec --groups $g --k $k --samples $n --device $device $* --out $f"
  meter "calibrate $name" "$bin/astra-train" calibrate --model "$model" --data "$spec" --groups "$g" --k "$k" \
    --samples "$n" --device "$device" "$@" --out "$f"
}

# evaluate TABLE METRIC MODEL DATA [flags]: one markdown table per model, written whole.
evaluate() {
  local name=$1 t=$out/tables/$1.md metric=$2 model=$3 spec=$4; shift 4
  if [[ -s $t ]]; then echo "skip: $t (done)"; return 0; fi
  say "evaluate $t"
  log_cmd "$bin/astra-eval $metric --model $model --data $spec --device $device $* $eval_extra --table $t"
  rm -f "$t.tmp"
  meter "evaluate $name" "$bin/astra-eval" "$metric" --model "$model" --data "$spec" --device "$device" "$@" $eval_extra --table "$t.tmp"
  mv "$t.tmp" "$t"
}

if wants setup; then
  say "setup and build"
  scripts/setup.sh
  [[ -n ${BIN:-} ]] || cargo build --release --workspace --bins
fi

if wants data && [[ -n $rehearse ]]; then
  rehearsal_data
elif wants data; then
  say "data"
  if [[ -z ${CIFAR100_DIR:-} ]]; then
    "$bin/astra-train" download --dataset cifar100 --dir "$c100"
  fi
  if [[ ! -s $wt/wiki.train.raw ]]; then
    mkdir -p "$data"
    zip=$data/wikitext-103-raw-v1.zip
    # curl -C - resumes a partial download.
    curl -fL -C - -o "$zip.part" "$wt_url"
    mv "$zip.part" "$zip"
    python3 - "$zip" "$wt" <<'EOF'
import os, sys, zipfile
src, dst = sys.argv[1], sys.argv[2]
tmp = dst + ".tmp"
with zipfile.ZipFile(src) as z:
    bad = z.testzip()
    if bad:
        sys.exit(f"{src}: corrupt member {bad}")
    z.extractall(tmp)
inner = os.path.join(tmp, "wikitext-103-raw")
os.rename(inner if os.path.isdir(inner) else tmp, dst)
EOF
  fi
  for f in wiki.train.raw wiki.valid.raw wiki.test.raw; do
    [[ -s $wt/$f ]] || { echo "reproduce-paper.sh: $wt/$f missing (WikiText-103 raw)" >&2; exit 1; }
  done
fi

# The image size is chosen when the baseline is fine-tuned; ASTRA runs inherit it from their init.
vit_flags=(--batch "$batch" --lr "$lr" --warmup-steps 500 --device "$device" $precision)
train_extra=${IMAGE_EXTRA:-}

if wants cifar; then
  spec=cifar100:$c100
  train vit-c100 finetune --init "$vit_init" --data "$spec" --epochs "${CIFAR_BASE_EPOCHS:-10}" "${vit_flags[@]}" --image-size "$image" --pad 4 --flip
  evaluate c100-original accuracy "$out/runs/vit-c100" "$spec" --devices 1 --vq off
  for g in "${groups[@]}"; do
    calibrate c100-g"$g" "$out/runs/vit-c100" "$spec" "$g" "$samples"
    train vit-c100-astra-g"$g" astra --init "$out/runs/vit-c100" --codebooks "$out/codebooks/c100-g$g.safetensors" \
      --devices "$n" --data "$spec" --epochs "${CIFAR_EPOCHS:-32}" "${vit_flags[@]}" --pad 4 --flip
    evaluate c100-astra-g"$g" accuracy "$out/runs/vit-c100-astra-g$g" "$spec" --devices "$n"
  done
  # Table 2: the device count, G = 32 (N = $n comes from the loop above).
  if [[ " ${groups[*]} " == *" 32 "* ]]; then
    for d in "${table2[@]}"; do
      train vit-c100-astra-g32-n"$d" astra --init "$out/runs/vit-c100" --codebooks "$out/codebooks/c100-g32.safetensors" \
        --devices "$d" --data "$spec" --epochs "${CIFAR_EPOCHS:-32}" "${vit_flags[@]}" --pad 4 --flip
      evaluate c100-astra-g32-n"$d" accuracy "$out/runs/vit-c100-astra-g32-n$d" "$spec" --devices "$d"
    done
  fi
fi

if wants imagenet; then
  if [[ -z ${IMAGENET_DIR:-} ]]; then
    say "imagenet: skipped (set IMAGENET_DIR to an ImageNet-1K folder with train/ and val/)"
  else
    spec=imagefolder:$IMAGENET_DIR
    evaluate imagenet-original accuracy "$imagenet_init" "$spec" --devices 1 --vq off
    for g in "${groups[@]}"; do
      calibrate imagenet-g"$g" "$imagenet_init" "$spec" "$g" "$samples"
      train vit-imagenet-astra-g"$g" astra --init "$imagenet_init" --codebooks "$out/codebooks/imagenet-g$g.safetensors" \
        --devices "$n" --data "$spec" --epochs "${IMAGENET_EPOCHS:-4}" "${vit_flags[@]}" --flip
      evaluate imagenet-astra-g"$g" accuracy "$out/runs/vit-imagenet-astra-g$g" "$spec" --devices "$n"
    done
  fi
fi

# The language-model runs' settings, shared by the text and wikipedia steps.
ctx=${CONTEXT:-1024}
text_flags=(--context "$ctx" --batch "${TEXT_BATCH:-8}" --lr "${TEXT_LR:-5e-5}" --warmup-steps 200
  --device "$device" $precision --epochs "${TEXT_EPOCHS:-1}")

if wants text; then
  train_extra=${TEXT_EXTRA:-}
  # Training selects its epoch on WikiText-103's own validation split; the sweeps score the last
  # file of a spec, its test split.
  train_spec=text:$wt/wiki.train.raw,$wt/wiki.valid.raw,$wt/wiki.test.raw
  test_spec=text:$wt/wiki.valid.raw,$wt/wiki.test.raw
  for m in "${gpt2_models[@]}"; do
    name=$(basename "$m")
    evaluate wt103-"$name"-pretrained perplexity "$m" "$test_spec" --context "$ctx" --devices 1 --vq off
    train "$name"-wt103 finetune --init "$m" --data "$train_spec" "${text_flags[@]}"
    evaluate wt103-"$name"-original perplexity "$out/runs/$name-wt103" "$test_spec" --context "$ctx" --devices 1 --vq off
    for g in "${groups[@]}"; do
      calibrate wt103-"$name"-g"$g" "$out/runs/$name-wt103" "$train_spec" "$g" "$text_samples" --context "$ctx"
      train "$name"-wt103-astra-g"$g" astra --init "$out/runs/$name-wt103" \
        --codebooks "$out/codebooks/wt103-$name-g$g.safetensors" --devices "$n" --data "$train_spec" "${text_flags[@]}"
      evaluate wt103-"$name"-astra-g"$g" perplexity "$out/runs/$name-wt103-astra-g$g" "$test_spec" \
        --context "$ctx" --devices "$n"
    done
  done
fi

# deploy NAME RUN INPUT.npy: export RUN (model + codebooks) as an HF folder, then run it on the
# runtime: N local workers over user-space shaped 10 Mbit/s links, one warm-up and 3 timed runs.
deploy() {
  local name=$1 run=$2 input=$3 dir=$out/deploy/$1
  if [[ -s $dir/runtime.json ]]; then echo "skip: $dir (done)"; return 0; fi
  say "deploy $dir"
  rm -rf "$dir" && mkdir -p "$dir"
  log_cmd "$bin/astra-train export --model $run --out $dir/model"
  meter "export $name" "$bin/astra-train" export --model "$run" --out "$dir/model"
  log_cmd "$bin/astra-eval distributed --model $dir/model --input $input --devices $n --links 10 --shaper user --warmup 1 --runs 3 --out $dir/logits.npy --json $dir/runtime.json"
  meter "runtime $name" "$bin/astra-eval" distributed --model "$dir/model" --input "$input" --devices "$n" \
    --links 10 --shaper user --warmup 1 --runs 3 --out "$dir/logits.npy" --json "$dir/runtime.json.tmp"
  mv "$dir/runtime.json.tmp" "$dir/runtime.json"
}

if wants deploy; then
  mkdir -p "$out/deploy"
  python3 - "$out/deploy" "$image" "$ctx" <<'EOF'
import random, struct, sys
d, side, ctx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(0)
def npy(path, descr, shape, fmt, values):  # .npy version 1.0, C order
    head = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}"
    head += " " * (63 - (10 + len(head)) % 64) + "\n"
    with open(path, "wb") as f:
        f.write(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head.encode())
        f.write(struct.pack(f"<{len(values)}{fmt}", *values))
npy(f"{d}/image.npy", "<f4", (1, 3, side, side), "f", [rng.gauss(0, 1) for _ in range(3 * side * side)])
npy(f"{d}/prompt.npy", "<i8", (1, ctx), "q", [rng.randrange(50257) for _ in range(ctx)])
EOF
  g_last=${groups[${#groups[@]}-1]}
  if [[ -d $out/runs/vit-c100-astra-g$g_last/model ]]; then
    deploy vit-c100-astra-g"$g_last" "$out/runs/vit-c100-astra-g$g_last" "$out/deploy/image.npy"
  fi
  name=$(basename "${gpt2_models[0]}")
  if [[ -d $out/runs/$name-wt103-astra-g$g_last/model ]]; then
    deploy "$name"-wt103-astra-g"$g_last" "$out/runs/$name-wt103-astra-g$g_last" "$out/deploy/prompt.npy"
  fi
fi

if wants sim; then
  if [[ -d $out/sim ]]; then
    echo "skip: $out/sim (done)"
  else
    say "simulator"
    log_cmd "$bin/astra-sim reproduce --out $out/sim"
    meter "simulate" "$bin/astra-sim" reproduce --out "$out/sim.tmp"
    rm -rf "$out/sim"
    mv "$out/sim.tmp" "$out/sim"
  fi
fi

if wants wikipedia; then
  train_extra=${TEXT_EXTRA:-}
  # The paper's zero-shot protocol: trained on Wikipedia, scored on WikiText-103's validation
  # split (the sweeps score a spec's last file; the first only has to be text).
  zero_shot_spec=text:$wt/wiki.test.raw,$wt/wiki.valid.raw
  for m in "${wiki_models[@]}"; do
    name=$(basename "$m")
    train "$name"-wiki finetune --init "$m" --data "$wiki_spec" "${text_flags[@]}"
    evaluate wiki-"$name"-original perplexity "$out/runs/$name-wiki" "$wiki_spec" --context "$ctx" --devices 1 --vq off
    evaluate zero-shot-"$name"-original perplexity "$out/runs/$name-wiki" "$zero_shot_spec" --context "$ctx" --devices 1 --vq off
    for g in "${groups[@]}"; do
      calibrate wiki-"$name"-g"$g" "$out/runs/$name-wiki" "$wiki_spec" "$g" "$text_samples" --context "$ctx"
      train "$name"-wiki-astra-g"$g" astra --init "$out/runs/$name-wiki" \
        --codebooks "$out/codebooks/wiki-$name-g$g.safetensors" --devices "$n" --data "$wiki_spec" "${text_flags[@]}"
      evaluate wiki-"$name"-astra-g"$g" perplexity "$out/runs/$name-wiki-astra-g$g" "$wiki_spec" --context "$ctx" --devices "$n"
      evaluate zero-shot-"$name"-astra-g"$g" perplexity "$out/runs/$name-wiki-astra-g$g" "$zero_shot_spec" \
        --context "$ctx" --devices "$n"
    done
  done
fi

if wants summary; then
  {
    echo "# The paper's experiments, reproduced"
    echo
    echo "Commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%F), device $device."
    echo "Targets: ../shared/ASTRA.md §5. Commands, in the order they ran: commands.txt."
    for t in "$out"/tables/*.md; do
      [[ -e $t ]] || continue
      echo
      echo "## $(basename "$t" .md)"
      cat "$t"
    done
  } >"$out/summary.md.tmp"
  mv "$out/summary.md.tmp" "$out/summary.md"
  say "summary: $out/summary.md"
  if [[ -n $rehearse ]]; then
    python3 scripts/lib/rehearsal_report.py "$out" "$rehearse" >"$out/rehearsal.md.tmp"
    mv "$out/rehearsal.md.tmp" "$out/rehearsal.md"
    say "rehearsal report: $out/rehearsal.md"
  fi
fi
