#!/usr/bin/env bash
# Call 2 (stop 41): how the workers' host threads wait for the GPU (ASTRA_CUDA_HOST_WAIT unset =
# driver's choice, block, yield), alternated, under MPS at N = 8; the same without MPS
# (time-sliced) at N = 4 with the previous runtime (.gpu/old = 81886ed) beside.
set -u
source .gpu/env.sh
R=/tmp/r2; mkdir -p $R/ab-mps $R/ab-ts
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) | tar czf $OUT/c2.tar.gz.part -T - ) && mv $OUT/c2.tar.gz.part $OUT/c2.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
cat .gpu/HEAD > $R/progress.txt
gpu=(BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 WORKER_DEVICE=cuda TOKENS=1024 GPT2_TOKENS=1024 SP_MBPS=" ")
env "${gpu[@]}" DEVICES="4" MBPS="100" VQ_GROUPS="1" MULTICAST_GROUPS="" timeout 120 scripts/bench/distributed-real.sh $R/ts > $R/ts.log 2>&1
mark "time-sliced N=4 set (new runtime, driver's wait) rc=$?"
one() { # DIR NAME N BIN WAIT ARCH
  local m=$R/ts/$6-t1024
  env ${5:+ASTRA_CUDA_HOST_WAIT=$5} timeout 60 $4 distributed --model $m --input $m/x.npy --devices $3 --codebooks $m/cb-g1.safetensors --links 100 --shaper user \
    --threads $((16 / $3)) --device cuda --runs 10 --warmup 2 --timeout-ms 60000 --json $1/$2.json --out /tmp/o.npy > $1/$2.log 2>&1 || echo "fail $2" >> $R/progress.txt
}
for rep in 1 2; do for arch in vit gpt2; do
  one $R/ab-ts $arch-n4-old-$rep 4 .gpu/old/astra-eval "" $arch
  one $R/ab-ts $arch-n4-new-$rep 4 .gpu/bin/astra-eval "" $arch
  one $R/ab-ts $arch-n4-block-$rep 4 .gpu/bin/astra-eval block $arch
done; done
mark "ab time-sliced"
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-ab-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-ab-log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
nvidia-cuda-mps-control -d && mark "mps started for ab"
for rep in 1 2; do for arch in vit gpt2; do for w in "" block yield; do
  one $R/ab-mps $arch-n8-${w:-driver}-$rep 8 .gpu/bin/astra-eval "$w" $arch
done; done; done
echo quit | nvidia-cuda-mps-control; sleep 1
mark "ab under mps"
