#!/usr/bin/env bash
# Call 1 (stop 42): binaries that measure each message's latency beyond the uplink (02557a7):
# the N = 4/8 GPU-worker sets under MPS (ASTRA_CUDA_HOST_WAIT=yield, as stop 41's call 4) and
# time-sliced, then CPU workers pinned, ViT N = 4, G = 1 at 10 Mbit/s, plain and with libgomp's
# threads bound to a core each (OMP_PROC_BIND=close OMP_PLACES=cores, single device likewise).
set -u
source .gpu/env.sh
R=/tmp/s42c1; mkdir -p $R
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) | tar czf $OUT/c1.tar.gz.part -T - ) && mv $OUT/c1.tar.gz.part $OUT/c1.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
cat .gpu/HEAD > $R/progress.txt
gpu=(BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 WORKER_DEVICE=cuda TOKENS=1024 GPT2_TOKENS=1024 SP_MBPS=" " DEVICES="4 8" MBPS="10 100" VQ_GROUPS="1 16" MULTICAST_GROUPS="16")
env "${gpu[@]}" MPS=1 ASTRA_CUDA_HOST_WAIT=yield timeout 225 scripts/bench/distributed-real.sh $R/gpu-mps > $R/gpu-mps.log 2>&1
mark "gpu mps yield rc=$?"
mkdir -p $R/gpu-ts; for f in vit-t1024 gpt2-t1024 words.txt vit-t1024.json gpt2-t1024.json; do cp -r $R/gpu-mps/$f $R/gpu-ts/ 2>/dev/null; done
env "${gpu[@]}" timeout 215 scripts/bench/distributed-real.sh $R/gpu-ts > $R/gpu-ts.log 2>&1
mark "gpu time-sliced rc=$?"
mkdir -p $R/cpu-pinned; for f in vit-t1024 vit-t1024.json; do cp -r $R/gpu-mps/$f $R/cpu-pinned/ 2>/dev/null; done
cpu=(BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 PIN=1 TOKENS=1024 GPT2_TOKENS=" " SP_MBPS=" " DEVICES="4" MBPS="10" VQ_GROUPS="1" MULTICAST_GROUPS="" RUNS=5)
env "${cpu[@]}" timeout 50 scripts/bench/distributed-real.sh $R/cpu-pinned > $R/cpu-pinned.log 2>&1
mark "cpu pinned vit rc=$?"
mkdir -p $R/cpu-bound; for f in vit-t1024 words.txt vit-t1024.json; do cp -r $R/cpu-pinned/$f $R/cpu-bound/ 2>/dev/null; done
env "${cpu[@]}" OMP_PROC_BIND=close OMP_PLACES=cores timeout 45 scripts/bench/distributed-real.sh $R/cpu-bound > $R/cpu-bound.log 2>&1
mark "cpu pinned vit, omp bound rc=$?"
cat $R/progress.txt
for d in gpu-mps gpu-ts cpu-pinned cpu-bound; do echo "== $d"; grep -hE "^\| 1024|^###|Largest" $R/$d/table.md | cut -d'|' -f2-13; done
