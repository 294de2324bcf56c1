#!/usr/bin/env bash
# Call 2 (stop 40): GPU workers under MPS (N = 4, 8; ViT and GPT-2), a same-call anchor without MPS,
# and an alternated A/B of --bind-threads on pinned CPU workers.
set -u
source .gpu/env.sh
R=/tmp/r2; mkdir -p $R $R/cpu-ab
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' \) | tar czf $OUT/c2.tar.gz.part -T - ) && mv $OUT/c2.tar.gz.part $OUT/c2.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
gpu=(BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 WORKER_DEVICE=cuda TOKENS=1024 GPT2_TOKENS=1024 SP_MBPS=" ")
nvidia-cuda-mps-control -d && mark "mps started"
env "${gpu[@]}" DEVICES="4 8" MBPS="10 100" VQ_GROUPS="1 16" MULTICAST_GROUPS="16" timeout 300 scripts/bench/distributed-real.sh $R/gpu-mps > $R/gpu-mps.log 2>&1
echo quit | nvidia-cuda-mps-control; sleep 1
mark "gpu under mps"
mkdir -p $R/gpu-ts; for f in vit-t1024 gpt2-t1024 words.txt vit-t1024.json gpt2-t1024.json; do cp -r $R/gpu-mps/$f $R/gpu-ts/ 2>/dev/null; done
env "${gpu[@]}" DEVICES="4" MBPS="100" VQ_GROUPS="1 16" MULTICAST_GROUPS="" timeout 100 scripts/bench/distributed-real.sh $R/gpu-ts > $R/gpu-ts.log 2>&1
mark "gpu time-sliced anchor"
m=$R/gpu-mps/vit-t1024
for rep in 1 2 3 4; do for b in 0 1; do
  extra=(); [[ $b == 1 ]] && extra=(--bind-threads)
  for n in 1 4; do
    args=(--devices $n --mode sp); [[ $n == 4 ]] && args=(--devices 4 --codebooks $m/cb-g1.safetensors --links 10 --shaper user)
    timeout 60 .gpu/bin/astra-eval distributed --model $m --input $m/x.npy "${args[@]}" --threads 4 --pin-cores "${extra[@]}" \
      --runs 5 --warmup 1 --timeout-ms 60000 --json $R/cpu-ab/n$n-bind$b-rep$rep.json --out /tmp/o.npy > /dev/null 2>>$R/cpu-ab.log || echo "fail n$n b$b r$rep" >> $R/cpu-ab.log
  done
done; [[ $rep == 1 ]] || true; mkdir -p $R/cpu-ab; done
mark "cpu ab"
cat $R/progress.txt
grep -h "^| 1024" $R/gpu-mps/table.md | cut -d'|' -f2-13
