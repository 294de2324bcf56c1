#!/usr/bin/env bash
# Call 1 (stop 43): where a pinned N = 4 worker's compute goes on the 16-core guest.
# 1. topology as the guest sees it; 2. each core's speed alone, all 16 at once, and core 0 beside
# each other core (1 thread, a 2-block encoder at T = 512); 3. one device's share (4 threads),
# alone on cores 0-3 and 8-11 and four copies at once; the single device likewise; 4. the runtime
# (ViT N = 4, G = 1, 10 Mbit/s, pinned) with the single device alone and beside its copies.
set -u
source .gpu/env.sh
R=/tmp/s43c1; mkdir -p $R/cb $R/sh
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) | tar czf $OUT/c1.tar.gz.part -T - ) && mv $OUT/c1.tar.gz.part $OUT/c1.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
B=.gpu/bin/astra-eval
cat .gpu/HEAD > $R/progress.txt
lscpu -e > $R/lscpu-e.txt 2>&1; cat /sys/devices/system/cpu/cpu*/topology/thread_siblings_list > $R/siblings.txt 2>&1
grep MHz /proc/cpuinfo > $R/mhz-idle.txt; cat /proc/loadavg >> $R/progress.txt
core() { OMP_NUM_THREADS=1 taskset -c $1 $B profile --methods single --tokens 512 --blocks 2 --runs 4 --out $R/cb/d-$2-$1 2>&1 | grep -E '^\| single' | awk -F'|' -v c=$1 -v w=$2 '{print w, c, $5}' >> $R/cb/cores.txt; }
for i in $(seq 0 15); do core $i alone; done
mark "cores alone"
for i in $(seq 0 15); do core $i all & done; wait
( grep MHz /proc/cpuinfo > $R/mhz-busy.txt ) 
mark "cores all at once"
for j in $(seq 1 15); do core 0 with$j & core $j pair$j & wait; done
mark "core 0 beside each"
share() { OMP_NUM_THREADS=4 taskset -c $1 $B profile --fast --methods $3 --devices 4 --tokens 1024 --runs $4 --out $R/sh/d-$2 2>&1 | grep -E '^\| (single|astra-g1) \| [0-9]' | awk -F'|' -v c=$1 -v w=$2 '{print w, c, $2, $5, $6, $7}' >> $R/sh/shares.txt; }
share 0-3 alone-0 astra-g1 10; share 8-11 alone-8 astra-g1 10; share 4-7 alone-4 astra-g1 10; share 12-15 alone-12 astra-g1 10
share 0-3 together astra-g1 25 & share 4-7 together astra-g1 25 & share 8-11 together astra-g1 25 & share 12-15 together astra-g1 25 & wait
share 0-3 alone-0 single 6; share 8-11 alone-8 single 6
share 0-3 together single 10 & share 4-7 together single 10 & share 8-11 together single 10 & share 12-15 together single 10 & wait
mark "shares and singles"
env BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 PIN=1 SINGLE_BESIDE=1 TOKENS=1024 GPT2_TOKENS=" " SP_MBPS=" " DEVICES="4" MBPS="10" VQ_GROUPS="1" MULTICAST_GROUPS="" RUNS=10 timeout 200 scripts/bench/distributed-real.sh $R/cpu > $R/cpu.log 2>&1
mark "runtime vit n4 rc=$?"
cat $R/progress.txt; sort -k1,1 -k2n $R/cb/cores.txt | awk '{printf "%s:%s=%s ", $1,$2,$3} END {print ""}'; cat $R/sh/shares.txt
grep -hE "^\| 1024|Largest" $R/cpu/table.md | cut -d'|' -f2-15
python3 -c "
import json,glob
for f in sorted(glob.glob('$R/cpu/*.json')):
  d=json.load(open(f)); 
  if 'compute_ms' in d: print(f.split('/')[-1], round(d['median_ms']), [round(c) for c in d['compute_ms']], [round(c) for c in d['wait_ms']])
"
