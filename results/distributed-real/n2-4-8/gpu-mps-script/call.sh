#!/usr/bin/env bash
# Call 3 (stop 40): distributed-real.sh's MPS=1 as committed; GPU profiles of a device's share.
set -u
source .gpu/env.sh
R=/tmp/r3; mkdir -p $R
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' \) | tar czf $OUT/c3.tar.gz.part -T - ) && mv $OUT/c3.tar.gz.part $OUT/c3.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
cat .gpu/HEAD > $R/progress.txt
env BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 WORKER_DEVICE=cuda MPS=1 DEVICES=4 TOKENS=1024 GPT2_TOKENS=1024 MBPS=100 VQ_GROUPS=1 MULTICAST_GROUPS= SP_MBPS=" " timeout 220 scripts/bench/distributed-real.sh $R/mps-script > $R/mps-script.log 2>&1
mark "mps-script rc=$?"
{ echo "mps processes after the script:"; pgrep -a -f nvidia-cuda-mps || echo none; } >> $R/progress.txt
for arch in encoder gpt2; do
  timeout 60 .gpu/bin/astra-eval profile --device cuda --fast --arch $arch --methods single,astra-g1,astra-g16 --devices 4,8 --tokens 1024 --runs 10 --out $R/prof-$arch > $R/prof-$arch.log 2>&1
  mark "profile $arch rc=$?"
done
cat $R/progress.txt; grep -E "^\| 1024|under" $R/mps-script/table.md | cut -c1-200; grep -E "^\| " $R/prof-*.log | head -30
