#!/usr/bin/env bash
# Call 3 (stop 42): binaries whose traces also replay the work of handling each received message
# (after it, in the order the messages came): the N = 4/8 GPU-worker sets again (under MPS with
# ASTRA_CUDA_HOST_WAIT=yield, then time-sliced).
set -u
source .gpu/env.sh
R=/tmp/s42c3; mkdir -p $R
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) | tar czf $OUT/c3.tar.gz.part -T - ) && mv $OUT/c3.tar.gz.part $OUT/c3.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
cat .gpu/HEAD > $R/progress.txt
nproc >> $R/progress.txt
gpu=(BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 WORKER_DEVICE=cuda TOKENS=1024 GPT2_TOKENS=1024 SP_MBPS=" " DEVICES="4 8" MBPS="10 100" VQ_GROUPS="1 16" MULTICAST_GROUPS="16")
env "${gpu[@]}" MPS=1 ASTRA_CUDA_HOST_WAIT=yield timeout 200 scripts/bench/distributed-real.sh $R/gpu-mps > $R/gpu-mps.log 2>&1
mark "gpu mps yield rc=$?"
mkdir -p $R/gpu-ts; for f in vit-t1024 gpt2-t1024 words.txt vit-t1024.json gpt2-t1024.json; do cp -r $R/gpu-mps/$f $R/gpu-ts/ 2>/dev/null; done
env "${gpu[@]}" timeout 190 scripts/bench/distributed-real.sh $R/gpu-ts > $R/gpu-ts.log 2>&1
mark "gpu time-sliced rc=$?"
cat $R/progress.txt
for d in gpu-mps gpu-ts; do echo "== $d"; grep -hE "^\| 1024|^###|Largest" $R/$d/table.md | cut -d"|" -f2-13; done
