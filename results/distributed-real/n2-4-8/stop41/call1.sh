#!/usr/bin/env bash
# Call 1 (stop 41): GPU workers under MPS with one upload per block (new) — the full N = 4/8 set —
# then an alternated A/B against the previous runtime (81886ed: one copy per source) under MPS.
set -u
source .gpu/env.sh
R=/tmp/r1; mkdir -p $R/ab
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) | tar czf $OUT/c1.tar.gz.part -T - ) && mv $OUT/c1.tar.gz.part $OUT/c1.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
cat .gpu/HEAD > $R/progress.txt; nvidia-smi --query-gpu=name,driver_version,compute_mode --format=csv >> $R/progress.txt
gpu=(BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 WORKER_DEVICE=cuda TOKENS=1024 GPT2_TOKENS=1024 SP_MBPS=" ")
env "${gpu[@]}" MPS=1 DEVICES="4 8" MBPS="10 100" VQ_GROUPS="1 16" MULTICAST_GROUPS="16" timeout 330 scripts/bench/distributed-real.sh $R/gpu-mps > $R/gpu-mps.log 2>&1
mark "gpu-mps rc=$?"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-ab-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-ab-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d && mark "mps started for ab"
for rep in 1 2; do for b in old new; do for arch in vit gpt2; do
  bin=.gpu/bin/astra-eval; [[ $b == old ]] && bin=.gpu/old/astra-eval
  m=$R/gpu-mps/$arch-t1024
  timeout 60 $bin distributed --model $m --input $m/x.npy --devices 8 --codebooks $m/cb-g1.safetensors --links 100 --shaper user \
    --threads 2 --device cuda --runs 10 --warmup 2 --timeout-ms 60000 --json $R/ab/$arch-n8-$b-$rep.json --out /tmp/o.npy > $R/ab/$arch-n8-$b-$rep.log 2>&1 || echo "fail $arch $b $rep" >> $R/progress.txt
done; done; done
echo quit | nvidia-cuda-mps-control; sleep 1
mark "ab under mps"
