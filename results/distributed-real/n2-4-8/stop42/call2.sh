#!/usr/bin/env bash
# Call 2 (stop 42): binaries in which a message waiting behind its sender thread's previous one
# counts as link time, not latency: the N = 4/8 GPU-worker sets again (under MPS with
# ASTRA_CUDA_HOST_WAIT=yield, then time-sliced), then CPU workers pinned, ViT G = 1 at 10 Mbit/s,
# N = 4 and 8, with the single device also measured beside N − 1 copies of itself (SINGLE_BESIDE=1).
set -u
source .gpu/env.sh
R=/tmp/s42c2; mkdir -p $R
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) | tar czf $OUT/c2.tar.gz.part -T - ) && mv $OUT/c2.tar.gz.part $OUT/c2.tar.gz; }
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
mkdir -p $R/cpu-beside; for f in vit-t1024 vit-t1024.json; do cp -r $R/gpu-mps/$f $R/cpu-beside/ 2>/dev/null; done
env BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 PIN=1 SINGLE_BESIDE=1 TOKENS=1024 GPT2_TOKENS=" " SP_MBPS=" " DEVICES="4 8" MBPS="10" VQ_GROUPS="1" MULTICAST_GROUPS="" RUNS=5 timeout 170 scripts/bench/distributed-real.sh $R/cpu-beside > $R/cpu-beside.log 2>&1
mark "cpu pinned vit, single beside copies rc=$?"
cat $R/progress.txt
for d in gpu-mps gpu-ts cpu-beside; do echo "== $d"; grep -hE "^\| 1024|^###|Largest" $R/$d/table.md | cut -d'|' -f2-15; done
