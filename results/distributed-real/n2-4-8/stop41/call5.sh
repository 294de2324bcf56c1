#!/usr/bin/env bash
# Call 5 (stop 41): binaries with the outside time in the trace: the time-sliced N = 4/8 GPU set,
# then CPU workers pinned, N = 4, G = 1 at 10 Mbit/s (GPT-2 first: its head is the largest).
set -u
source .gpu/env.sh
R=/tmp/r5; mkdir -p $R
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) | tar czf $OUT/c5.tar.gz.part -T - ) && mv $OUT/c5.tar.gz.part $OUT/c5.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
cat .gpu/HEAD > $R/progress.txt
env BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 WORKER_DEVICE=cuda TOKENS=1024 GPT2_TOKENS=1024 SP_MBPS=" " DEVICES="4 8" MBPS="10 100" VQ_GROUPS="1 16" MULTICAST_GROUPS="16" timeout 200 scripts/bench/distributed-real.sh $R/gpu-ts > $R/gpu-ts.log 2>&1
mark "gpu time-sliced rc=$?"
env BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 PIN=1 TOKENS=" " GPT2_TOKENS=1024 SP_MBPS=" " DEVICES="4" MBPS="10" VQ_GROUPS="1" MULTICAST_GROUPS="" RUNS=3 timeout 120 scripts/bench/distributed-real.sh $R/cpu-pinned > $R/cpu-pinned.log 2>&1
mark "cpu pinned gpt2 rc=$?"
cat $R/progress.txt
for d in gpu-ts cpu-pinned; do echo "== $d"; grep -hE "^\| 1024|^###|Largest" $R/$d/table.md | cut -d'|' -f2-13; done
