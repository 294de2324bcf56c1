# Sourced by scripts/reproduce-paper.sh for `--rehearse full|tiny`: the recipe's settings for a
# rehearsal on generated data (every one can still be overridden from the environment), and the
# data step that generates that data. The real recipe's sizes and epochs, which the report projects
# to, are written to $OUT/rehearsal.json.
case $rehearse in
  full | tiny) ;;
  *) echo "reproduce-paper.sh: --rehearse must be full or tiny, not '$rehearse'" >&2; exit 2 ;;
esac
OUT=${OUT:-results/rehearsal-$rehearse}
STEPS=${STEPS:-data cifar imagenet text deploy sim wikipedia summary}
rehearsal_dir=$OUT/data rehearsal_models=$OUT/data/models
if [[ $rehearse == full ]]; then
  # Sized for one 10-minute call on one H200 (~80 commands, each paying its start-up). What the
  # rehearsal does not run itself, the report derives from the measured step it repeats (named in
  # its table): G = 16 from G = 32 (the same shapes with half the codebooks), Table 2's N = 2 and 6
  # from N = 8, Wikipedia's GPT-2 medium from WikiText-103's (the same model; the data path is
  # Wikipedia's GPT-2 small). Calibration draws 250 images (CALIB_SAMPLES) or 32 windows
  # (TEXT_CALIB_SAMPLES; 32k rows: 250 would already fill the K × 256-row reservoir and cost
  # ~60 s each) and is projected to the recipe's 2,000 phase by phase (rehearsal_report.py).
  # Training rates are the steady state after each run's first steps (summary.csv's warmup_*).
  : "${REHEARSAL_STEPS:=30}" "${DEVICE:=cuda}" "${PRECISION=--bf16}" "${BATCH:=128}" "${TEXT_BATCH:=8}"
  : "${CONTEXT:=1024}" "${IMAGE_SIZE:=224}" "${K:=1024}" "${VQ_GROUPS:=1 32}" "${DEVICES:=4}"
  : "${TABLE2_DEVICES:=8}" "${REHEARSAL_VALID:=256}" "${EVAL_EXTRA:=--max-test 128}" "${CALIB_SAMPLES:=250}"
  : "${TEXT_CALIB_SAMPLES:=32}"
  : "${WIKI_GPT2_MODELS:=$rehearsal_models/gpt2}"
else
  : "${REHEARSAL_STEPS:=2}" "${DEVICE:=cpu}" "${PRECISION=}" "${BATCH:=8}" "${TEXT_BATCH:=4}"
  : "${CONTEXT:=32}" "${IMAGE_SIZE:=32}" "${K:=16}" "${VQ_GROUPS:=1 32}" "${DEVICES:=4}"
  : "${TABLE2_DEVICES:=2}" "${REHEARSAL_VALID:=16}" "${EVAL_EXTRA:=--max-test 8}" "${CALIB_SAMPLES:=8}"
fi
# One epoch of REHEARSAL_STEPS steps per training run; the report scales to the real epochs.
real_epochs="{\"cifar_base\": ${CIFAR_BASE_EPOCHS:-10}, \"cifar_astra\": ${CIFAR_EPOCHS:-32}, \"imagenet_astra\": ${IMAGENET_EPOCHS:-4}, \"text\": ${TEXT_EPOCHS:-1}}"
CIFAR_BASE_EPOCHS=1 CIFAR_EPOCHS=1 IMAGENET_EPOCHS=1 TEXT_EPOCHS=1
IMAGE_EXTRA="--max-train $((REHEARSAL_STEPS * BATCH)) --valid $REHEARSAL_VALID ${IMAGE_EXTRA:-}"
TEXT_EXTRA="--max-train $((REHEARSAL_STEPS * TEXT_BATCH)) ${TEXT_EXTRA:-}"
VIT_INIT=$rehearsal_models/vit-in21k IMAGENET_INIT=$rehearsal_models/vit-imagenet
GPT2_MODELS=${GPT2_MODELS:-"$rehearsal_models/gpt2 $rehearsal_models/gpt2-medium"}
CIFAR100_DIR=$rehearsal_dir/cifar100 IMAGENET_DIR=$rehearsal_dir/imagenet
WIKITEXT103_DIR=$rehearsal_dir/wikitext-103-raw WIKIPEDIA=$rehearsal_dir/wikipedia/20231101.en
# The rehearsal's token caches stay in its folder (a real run keeps them in ~/.cache/astra).
export ASTRA_CACHE=${ASTRA_CACHE:-$OUT/cache}

# The data step of a rehearsal: generated data and random models, made once.
rehearsal_data() {
  mkdir -p "$OUT"
  cat >"$OUT/rehearsal.json" <<JSON
{"mode": "$rehearse", "steps_per_run": $REHEARSAL_STEPS, "batch": $BATCH, "text_batch": $TEXT_BATCH,
 "context": $CONTEXT, "image_size": $IMAGE_SIZE, "device": "$DEVICE", "groups": "$VQ_GROUPS",
 "devices": $DEVICES, "table2_devices": "$TABLE2_DEVICES", "valid_images": $REHEARSAL_VALID,
 "k": $K, "calib_samples": $CALIB_SAMPLES, "text_calib_samples": ${TEXT_CALIB_SAMPLES:-$CALIB_SAMPLES}, "gpt2_models": "$(basename -a $GPT2_MODELS | xargs)",
 "wiki_gpt2_models": "$(basename -a ${WIKI_GPT2_MODELS:-$GPT2_MODELS} | xargs)",
 "recipe": {"groups": "$recipe_groups", "table2_devices": "$recipe_table2", "calib_samples": $recipe_samples,
            "gpt2_models": "$(basename -a $recipe_gpt2 | xargs)"},
 "real_epochs": $real_epochs, "commit": "${REHEARSAL_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}",
 "gpu": "$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)"}
JSON
  if [[ -s $rehearsal_dir/sizes.json ]]; then
    echo "skip: $rehearsal_dir (done)"
    return 0
  fi
  say "rehearsal data ($rehearse) in $rehearsal_dir"
  rm -rf "$rehearsal_dir.tmp"
  meter "generate data" python3 scripts/lib/rehearsal_data.py "$rehearse" "$rehearsal_dir.tmp" "$bin/astra-train"
  mv "$rehearsal_dir.tmp" "$rehearsal_dir"
}
