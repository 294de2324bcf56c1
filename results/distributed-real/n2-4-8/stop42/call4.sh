#!/usr/bin/env bash
# Call 4 (stop 42): CPU workers pinned, N = 4, G = 1 at 10 Mbit/s, ViT and GPT-2 prefill, 10 timed
# runs, the single device measured alone and beside 3 copies of itself (SINGLE_BESIDE=1).
set -u
source .gpu/env.sh
R=/tmp/s42c4; mkdir -p $R
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) | tar czf $OUT/c4.tar.gz.part -T - ) && mv $OUT/c4.tar.gz.part $OUT/c4.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
cat .gpu/HEAD > $R/progress.txt
env BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 PIN=1 SINGLE_BESIDE=1 TOKENS=1024 GPT2_TOKENS=1024 SP_MBPS=" " DEVICES="4" MBPS="10" VQ_GROUPS="1" MULTICAST_GROUPS="" RUNS=10 timeout 280 scripts/bench/distributed-real.sh $R/cpu-beside > $R/cpu-beside.log 2>&1
mark "cpu pinned, single beside copies rc=$?"
cat $R/progress.txt
grep -hE "^\| 1024|^###|Largest" $R/cpu-beside/table.md | cut -d'|' -f2-15
