#!/usr/bin/env bash
# Call 2 (stop 44): CPU workers pinned, distinct codewords on, ViT and GPT-2 prefill at N = 4 and
# 8, G = 1, 10 Mbit/s, in rounds (each: the single device alone, ASTRA, the single device beside
# its N - 1 copies; RUNS = 10): the binaries of this stop, whose summaries report each worker's
# remote keys a block (the distinct codewords it attended to).
set -u
source .gpu/env.sh
R=/tmp/s44c2; mkdir -p $R
save() { (cd $R && find . -type f \( -name '*.json' -o -name '*.md' -o -name '*.csv' -o -name '*.log' -o -name '*.txt' -o -name '*.png' \) | tar czf $OUT/c2.tar.gz.part -T - ) && mv $OUT/c2.tar.gz.part $OUT/c2.tar.gz; }
t0=$(date +%s)
mark() { echo "$1 at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save; }
cat .gpu/HEAD > $R/progress.txt
for i in 1 2 3; do
  mkdir -p $R/r$i; [[ -d $R/r1/vit-t1024 ]] && cp -r $R/r1/vit-t1024 $R/r1/vit-t1024.json $R/r1/gpt2-t1024 $R/r1/gpt2-t1024.json $R/r1/words.txt $R/r$i/ 2>/dev/null
  env BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 PIN=1 SINGLE_BESIDE=1 TOKENS=1024 GPT2_TOKENS=1024 SP_MBPS=" " DEVICES="4 8" MBPS="10" VQ_GROUPS="1" MULTICAST_GROUPS="" RUNS=10 timeout 250 scripts/bench/distributed-real.sh $R/r$i > $R/r$i.log 2>&1
  mark "round $i rc=$?"
  (( $(date +%s) - t0 > 300 )) && break
done
cat $R/progress.txt
python3 - <<PY
import json, glob, os
for d in sorted(glob.glob('$R/r[0-9]')):
    for p in ('t1024', 'gpt2-t1024'):
        for n in (4, 8):
            try:
                s = json.load(open(f'{d}/{p}-n{n}-single.json'))['median_ms']
                b = json.load(open(f'{d}/{p}-n{n}-single-beside.json'))['median_ms']
                a = json.load(open(f'{d}/{p}-n{n}-r10-g1.json'))
            except Exception as e:
                print(d, p, n, 'incomplete'); continue
            keys = [round(sum(k) / len(k)) for k in a.get('remote_keys', [[0]])]
            print(os.path.basename(d), p, 'N', n, 'single', round(s,1), 'beside', round(b,1), 'astra', round(a['median_ms'],1), 'x alone %.2f x beside %.2f' % (s / a['median_ms'], b / a['median_ms']), 'keys', keys)
PY
