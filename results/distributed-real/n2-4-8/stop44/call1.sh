#!/usr/bin/env bash
# Call 1 (stop 44): GPU workers (all sharing the one H200) with attention to distinct remote
# codewords on (the default) and off (ASTRA_DISTINCT_CODEWORDS=off), alternated: under CUDA MPS
# (host threads yield) and time-sliced; ViT and GPT-2 prefill, T = 1024, N = 4 and 8, G = 1,
# 10 and 100 Mbit/s shaped in user space. The summaries carry each worker's remote keys a block.
set -u
source .gpu/env.sh
R=/tmp/s44c1; mkdir -p $R
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) | tar czf $OUT/c1.tar.gz.part -T - ) && mv $OUT/c1.tar.gz.part $OUT/c1.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
cat .gpu/HEAD > $R/progress.txt
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader >> $R/progress.txt
gpu=(BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 WORKER_DEVICE=cuda TOKENS=1024 GPT2_TOKENS=1024 SP_MBPS=" " DEVICES="4 8" MBPS="10 100" VQ_GROUPS="1" MULTICAST_GROUPS="")
set_() { # NAME DISTINCT [MPS env...]
  local name=$1 on=$2; shift 2
  mkdir -p $R/$name; [[ -d $R/mps-on/vit-t1024 ]] && for f in vit-t1024 gpt2-t1024 words.txt vit-t1024.json gpt2-t1024.json; do cp -r $R/mps-on/$f $R/$name/ 2>/dev/null; done
  env "${gpu[@]}" ASTRA_DISTINCT_CODEWORDS=$on "$@" timeout 140 scripts/bench/distributed-real.sh $R/$name > $R/$name.log 2>&1
  mark "$name rc=$?"
}
set_ mps-on on MPS=1 ASTRA_CUDA_HOST_WAIT=yield
set_ mps-off off MPS=1 ASTRA_CUDA_HOST_WAIT=yield
set_ ts-on on
set_ ts-off off
cat $R/progress.txt
python3 - <<PY
import json, glob, os
for d in ('mps-on', 'mps-off', 'ts-on', 'ts-off'):
    for f in sorted(glob.glob(f'$R/{d}/*-g1.json')):
        a = json.load(open(f))
        keys = [round(sum(k) / len(k)) for k in a.get('remote_keys', [[0]])]
        print(d, os.path.basename(f), round(a['median_ms'], 1), 'compute', [round(c, 1) for c in a['compute_ms']], 'keys', keys)
PY
