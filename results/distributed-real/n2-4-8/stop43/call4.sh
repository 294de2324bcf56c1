#!/usr/bin/env bash
# Call 4 (stop 43): attention to distinct remote codewords (on by default) against every remote
# token (ASTRA_DISTINCT_CODEWORDS=off). 1. a device's share profiled alone (4 threads, cores
# 8-11), T = 1024 and 4096, N = 4, G = 1 (uniform random indices), on/off interleaved, and the
# single device; 2. the runtime, ViT and GPT-2 prefill, N = 4, G = 1, 10 Mbit/s, pinned, the
# single device alone and beside its copies, on then off.
set -u
source .gpu/env.sh
R=/tmp/s43c4; mkdir -p $R/prof
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) | tar czf $OUT/c4.tar.gz.part -T - ) && mv $OUT/c4.tar.gz.part $OUT/c4.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
B=.gpu/bin/astra-eval
cat .gpu/HEAD > $R/progress.txt
prof() { ASTRA_DISTINCT_CODEWORDS=$1 OMP_NUM_THREADS=4 taskset -c 8-11 $B profile --fast --methods $2 --devices 4 --tokens $3 --runs $4 --out $R/prof/d 2>&1 | grep -E '^\| (single|astra-g1) \| [0-9]' | awk -F'|' -v w=$1 '{print w, $2, $4, $5, $6, $7}' >> $R/prof/profile.txt; }
for rep in 1 2; do prof on astra-g1 1024 10; prof off astra-g1 1024 10; done
prof on single 1024 6
for rep in 1 2; do prof on astra-g1 4096 4; prof off astra-g1 4096 4; done
prof on single 4096 3
mark "profiles"
run() { env ASTRA_DISTINCT_CODEWORDS=$1 BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 PIN=1 SINGLE_BESIDE=1 TOKENS=1024 GPT2_TOKENS=1024 SP_MBPS=" " DEVICES="4" MBPS="10" VQ_GROUPS="1" MULTICAST_GROUPS="" RUNS=10 timeout 170 scripts/bench/distributed-real.sh $R/cpu-$1 > $R/cpu-$1.log 2>&1; }
run on; mark "runtime on rc=$?"
mkdir -p $R/cpu-off; for f in vit-t1024 gpt2-t1024 words.txt vit-t1024.json gpt2-t1024.json; do cp -r $R/cpu-on/$f $R/cpu-off/ 2>/dev/null; done
run off; mark "runtime off rc=$?"
cat $R/progress.txt $R/prof/profile.txt
for d in cpu-on cpu-off; do echo "== $d"; grep -hE "^\| 1024|^## |Largest" $R/$d/table.md | cut -d'|' -f2-15; done
python3 -c "
import json,glob
for f in sorted(glob.glob('$R/cpu-*/*r10-g1.json')):
  d=json.load(open(f)); print(f.split('/')[-2:], round(d['median_ms']), [round(c) for c in d['compute_ms']], [round(c) for c in d['wait_ms']])
"
