#!/usr/bin/env bash
# Call 5 (stop 43): ViT N = 4, G = 1, 10 Mbit/s, CPU workers pinned, in 8 rounds alternating
# distinct codewords on and off (ASTRA_DISTINCT_CODEWORDS); every round measures the single device
# alone, ASTRA, and the single device beside its 3 copies (distributed-real.sh, RUNS = 10), so
# each round's speedups compare runs minutes apart at most, not across the call.
set -u
source .gpu/env.sh
R=/tmp/s43c5; mkdir -p $R
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) | tar czf $OUT/c5.tar.gz.part -T - ) && mv $OUT/c5.tar.gz.part $OUT/c5.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
cat .gpu/HEAD > $R/progress.txt
round() { # NAME ON|OFF
  mkdir -p $R/$1; [[ -d $R/r1-on/vit-t1024 ]] && cp -r $R/r1-on/vit-t1024 $R/r1-on/vit-t1024.json $R/$1/
  env ASTRA_DISTINCT_CODEWORDS=$2 BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 PIN=1 SINGLE_BESIDE=1 TOKENS=1024 GPT2_TOKENS=" " SP_MBPS=" " DEVICES="4" MBPS="10" VQ_GROUPS="1" MULTICAST_GROUPS="" RUNS=10 timeout 110 scripts/bench/distributed-real.sh $R/$1 > $R/$1.log 2>&1
  mark "$1 rc=$?"
}
for i in 1 2 3 4; do round r$i-on on; round r$i-off off; (( $(date +%s) - t0 > 480 )) && break; done
cat $R/progress.txt
python3 - <<PY
import json, glob, os
for d in sorted(glob.glob('$R/r*-o*')):
    if not os.path.isdir(d): continue
    try:
        s = json.load(open(d + '/t1024-n4-single.json'))['median_ms']
        b = json.load(open(d + '/t1024-n4-single-beside.json'))['median_ms']
        a = json.load(open(d + '/t1024-n4-r10-g1.json'))
    except Exception as e:
        print(d, 'incomplete', e); continue
    print(os.path.basename(d), 'single', round(s,1), 'beside', round(b,1), 'astra', round(a['median_ms'],1), 'x alone %.2f x beside %.2f' % (s / a['median_ms'], b / a['median_ms']), [round(c) for c in a['compute_ms']])
PY
