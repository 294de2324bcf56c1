#!/usr/bin/env bash
# Table 5's speedups: ASTRA combined with 8-bit weights, from compute measured on this CPU. Profiles
# the paper's encoder (12 × 768, T tokens, N devices) with fp32 and with int8 linear layers
# (`astra-eval profile --weights int8`: fbgemm's dynamic int8 linear, the kernel 8-bit weights buy
# on a CPU), then predicts each method's latency over the link with astra-sim, the speedup taken
# over the fp32 original on one device (`astra-sim sweep --baseline`). 4-bit weights have no
# CPU kernel in libtorch: they are dequantized on load and compute as fp32 (the fp32 rows).
#   scripts/bench/ptq-speedup.sh OUT_DIR        (release binaries in BIN)
# Environment: BIN (target/release), DEVICES (4), TOKENS (197: ViT-B/16 at 224²), MBPS
# (10,20,50,100), RUNS (5), THREADS (libtorch threads; default all cores).
set -euo pipefail
out=${1:?usage: ptq-speedup.sh OUT_DIR}
bin=${BIN:-target/release}
n=${DEVICES:-4} t=${TOKENS:-197} mbps=${MBPS:-10,20,50,100}
methods=single,astra-g1,astra-g16,astra-g32
mkdir -p "$out"
[[ -n ${THREADS:-} ]] && export OMP_NUM_THREADS=$THREADS
for w in fp32 int8; do
  "$bin/astra-eval" profile --weights "$w" --fast --methods "$methods" --devices "$n" --tokens "$t" \
    --runs "${RUNS:-5}" --out "$out/profile-$w" >"$out/profile-$w.txt"
  "$bin/astra-sim" sweep --methods "$methods" --devices "$n" --tokens "$t" --mbps "$mbps" \
    --profile "$out/profile-$w/profile.csv" --baseline "$out/profile-fp32/profile.csv" \
    --out "$out/sweep-$w.csv" 2>/dev/null
done
python3 - "$out" "$n" "$t" <<'PY'
import csv, sys
out, n, t = sys.argv[1:]
rows = {w: list(csv.DictReader(open(f"{out}/sweep-{w}.csv"))) for w in ("fp32", "int8")}
mbps = sorted({float(r["mbps"]) for r in rows["fp32"]})
print(f"Encoder 12 × 768, T = {t}, N = {n} (single: one device), latency predicted by astra-sim's paper model "
      f"from the measured per-device compute; speedup over fp32 weights on one device.\n")
print("| method | weights | compute (ms) | " + " | ".join(f"{m:g} Mbit/s" for m in mbps) + " |")
print("|---|---|---:|" + "---:|" * len(mbps))
for method in ("single", "astra-g1", "astra-g16", "astra-g32"):
    for w, label in (("fp32", "fp32 (and 4-bit, dequantized)"), ("int8", "8-bit, int8 compute")):
        rs = {float(r["mbps"]): r for r in rows[w] if r["method"] == method}
        if not rs:
            continue
        c = float(next(iter(rs.values()))["compute_ms"])
        cells = " | ".join(f"{float(rs[m]['latency_ms']):.1f} ms ({float(rs[m]['speedup']):.2f}×)" for m in mbps)
        print(f"| {method} | {label} | {c:.1f} | {cells} |")
PY
