#!/usr/bin/env bash
# Our k-means against faiss.Kmeans on the same data, the same thread count, the same K, iterations,
# seed policy (random initial rows, seed 1) and 256 points per centroid. Prints a table and writes it,
# with the command and commit, to results/kmeans-vs-faiss.md.
#   scripts/bench-kmeans.sh [--quick]     (--quick: case (a) only)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh >/dev/null
py=.venv/bin/python
$py -c "import faiss" 2>/dev/null || .venv/bin/pip install --disable-pip-version-check -q faiss-cpu
cargo build --release -q -p astra-quant
threads=${THREADS:-$(nproc)}
iters=${ITERS:-25}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# name n d K repeats (the median time of the repeats is reported; case (b) takes minutes a run)
cases=("a 65536 48 1024 3" "b 262144 768 1024 3")
[[ ${1:-} == --quick ]] && cases=("a 65536 48 1024 1")
rows=""
for c in "${cases[@]}"; do
  read -r name n d k repeats <<<"$c"
  echo "case ($name): n=$n d=$d K=$k, $iters iterations at most, $threads threads, $repeats run(s) each" >&2
  $py scripts/bench/kmeans_faiss.py data --n "$n" --d "$d" --centers $((4 * k)) --seed 7 --out "$work/x.npy"
  ours_t=() faiss_t=()
  for ((r = 0; r < repeats; r++)); do
    target/release/astra-quant --threads "$threads" fit --input "$work/x.npy" --k "$k" --groups 1 --iters "$iters" \
      --seed 1 --init random --max-points-per-centroid 256 --quiet --out "$work/ours.safetensors" --report "$work/ours.json" >/dev/null
    ours_t+=("$($py -c "import json; print(json.load(open('$work/ours.json'))['fit_seconds'])")")
    $py scripts/bench/kmeans_faiss.py faiss --input "$work/x.npy" --k "$k" --iters "$iters" --seed 1 --threads "$threads" \
      --out "$work/faiss.npy" --report "$work/faiss.json"
    faiss_t+=("$($py -c "import json; print(json.load(open('$work/faiss.json'))['fit_seconds'])")")
  done
  median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  ours_s=$(median "${ours_t[@]}")
  faiss_s=$(median "${faiss_t[@]}")
  ours_it=$($py -c "import json; print(len(json.load(open('$work/ours.json'))['groups_stats'][0]))")
  faiss_it=$($py -c "import json; print(json.load(open('$work/faiss.json'))['iterations'])")
  ours_obj=$($py scripts/bench/kmeans_faiss.py objective --input "$work/x.npy" --centroids "$work/ours.safetensors" --threads "$threads")
  faiss_obj=$($py scripts/bench/kmeans_faiss.py objective --input "$work/x.npy" --centroids "$work/faiss.npy" --threads "$threads")
  rows+=$($py - "$name" "$n" "$d" "$k" "$ours_s" "$faiss_s" "$ours_obj" "$faiss_obj" "$ours_it" "$faiss_it" "$repeats" <<'PY'
import sys
name, n, d, k, os_, fs, oo, fo, oi, fi, rep = sys.argv[1:]
os_, fs, oo, fo = map(float, (os_, fs, oo, fo))
print(f"| ({name}) | {n} | {d} | {k} | {rep} | {oi} / {fi} | {os_:.2f} | {fs:.2f} | {fs/os_:.2f}× | {oo:.6e} | {fo:.6e} | {100*(oo-fo)/fo:+.3f}% |")
PY
)$'\n'
done
faiss_v=$($py -c "import faiss; print(faiss.__version__)")
commit=$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- astra-quant || echo "+dirty")
cpu=$(lscpu | sed -n 's/^Model name: *//p' | head -1)
table="| case | n | d | K | runs | iterations ours / faiss | ours (s) | faiss (s) | speed ours/faiss | ours objective | faiss objective | objective diff |
|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|
$rows"
echo "$table"
mkdir -p results
cat >results/kmeans-vs-faiss.md <<MD
# k-means: astra-quant against faiss

Command: \`scripts/bench-kmeans.sh $*\` (commit $commit), $iters iterations, $threads threads, on
$cpu ($(nproc) cores), faiss-cpu $faiss_v from PyPI. Data: a Gaussian mixture of 4·K centres
(numpy, seed 7). Both sides: random initial rows (seed 1), at most 256 points per centroid, same
K and iterations. Time is \`fit\` alone (data already in memory), measured by each program itself.
Objective: mean squared distance of all n rows to the nearest centroid, computed for both by the
same code (faiss.IndexFlatL2, float64 sum). "speed ours/faiss" above 1 means we are faster.

$table
MD
echo "wrote results/kmeans-vs-faiss.md" >&2
