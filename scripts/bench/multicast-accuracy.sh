#!/usr/bin/env bash
# Accuracy of an image classifier run by the real runtime (`astra-eval distributed`, N worker
# processes) over TCP and over UDP multicast with whole index messages lost in user space at each
# LOSS rate: the test images in batches (one runtime invocation per batch; a lost message masks its
# sender's tokens for the whole batch in that block), top-1 accuracy from the logits the
# coordinator writes, and the message loss each run reports.
#   scripts/bench/multicast-accuracy.sh MODEL_DIR fashion-mnist:DIR OUT_DIR
# Environment: DEVICES (4), IMAGES (1000: the first test images), BATCH (100), LOSS ("0 5 20", %),
# BIN (target/release), PYTHON. Writes OUT_DIR/table.md.
set -euo pipefail
model=${1:?usage: multicast-accuracy.sh MODEL_DIR fashion-mnist:DIR OUT_DIR}
data=${2:?usage: multicast-accuracy.sh MODEL_DIR fashion-mnist:DIR OUT_DIR}
out=${3:?usage: multicast-accuracy.sh MODEL_DIR fashion-mnist:DIR OUT_DIR}
n=${DEVICES:-4}
images=${IMAGES:-1000}
batch=${BATCH:-100}
read -r -a loss_list <<<"${LOSS:-0 5 20}"
bin=${BIN:-target/release}
py=${PYTHON:-$([[ -x .venv/bin/python ]] && echo .venv/bin/python || echo python3)}
[[ $data == fashion-mnist:* ]] || { echo "multicast-accuracy.sh: only fashion-mnist:DIR is supported, got '$data'" >&2; exit 1; }
mkdir -p "$out"
# The test images as the trainer normalises them (x / 255 − 0.2860) / 0.3530, in batches.
$py - "${data#fashion-mnist:}" "$out" "$images" "$batch" <<'EOF'
import gzip, sys
import numpy as np
d, out, images, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with gzip.open(f"{d}/t10k-images-idx3-ubyte.gz") as f:
    x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)[:images]
with gzip.open(f"{d}/t10k-labels-idx1-ubyte.gz") as f:
    y = np.frombuffer(f.read(), np.uint8, offset=8)[:images].astype(np.int64)
x = ((x.astype(np.float32) / 255.0) - 0.2860) / 0.3530
for i in range(0, len(x), batch):
    np.save(f"{out}/x{i // batch:04d}.npy", x[i:i + batch])
np.save(f"{out}/labels.npy", y)
EOF
settings=("tcp" "${loss_list[@]/#/mc}")
for s in "${settings[@]}"; do
  for x in "$out"/x[0-9]*.npy; do
    b=$(basename "$x" .npy)
    [[ -s $out/$s-$b.json ]] && continue
    args=(--transport tcp)
    [[ $s == mc* ]] && args=(--transport multicast --links "1000,0,${s#mc}" --shaper user)
    "$bin/astra-eval" distributed --model "$model" --devices "$n" --input "$x" --out "$out/$s-$b.npy" \
      --json "$out/$s-$b.json" "${args[@]}" >/dev/null
  done
done
$py - "$out" "$n" "${settings[@]}" <<'EOF' | tee "$out/table.md"
import glob, json, sys
import numpy as np
out, n, settings = sys.argv[1], sys.argv[2], sys.argv[3:]
y = np.load(f"{out}/labels.npy")
print(f"| transport | message loss set (user space) | messages lost (seen) | accuracy % ({len(y)} test images, N = {n}) |")
print("|---|---:|---:|---:|")
for s in settings:
    files = sorted(glob.glob(f"{out}/{s}-x*.npy"))
    pred = np.concatenate([np.load(f).argmax(-1) for f in files])
    summaries = [json.load(open(f[:-4] + ".json")) for f in files]
    lost = sum(sum(j["lost_messages"]) for j in summaries)
    expected = sum(sum(j["expected_messages"]) for j in summaries)
    acc = 100.0 * (pred == y[: len(pred)]).mean()
    name, rate = ("TCP", "–") if s == "tcp" else ("multicast", f"{s[2:]}%")
    print(f"| {name} | {rate} | {lost} of {expected} ({100.0 * lost / expected:.1f}%) | {acc:.2f} |")
EOF
