#!/usr/bin/env bash
# Call 3 (stop 43): a forward's GEMMs with cold weights at M = 1025 and 257, 4 threads: F.linear
# against weights packed once (MKL) or reordered once (oneDNN); alone on cores 8-11 (twice), then
# four copies at once.
set -u
R=$OUT/gemms; mkdir -p $R
S=results/distributed-real/n2-4-8/stop43/gemms.py
for rep in 1 2; do OMP_NUM_THREADS=4 taskset -c 8-11 python3 $S 10 > $R/alone-$rep.md 2>&1; done
for c in 0-3 4-7 8-11 12-15; do OMP_NUM_THREADS=4 taskset -c $c python3 $S 10 > $R/together-$c.md 2>&1 & done; wait
cat $R/alone-1.md $R/alone-2.md; for c in 0-3 4-7 8-11 12-15; do tail -3 $R/together-$c.md; done
