#!/usr/bin/env bash
# Call 2 (stop 43): per-op timings of a ViT-B block at M = 1024 (single device) and 257 (a share
# of 4) at 4 threads: alone on cores 8-11, then four copies at once (cores 0-3 ... 12-15).
set -u
R=$OUT/ops; mkdir -p $R
S=results/distributed-real/n2-4-8/stop43/ops.py
python3 -c "import torch; print(torch.__version__, torch.__config__.parallel_info())" > $R/torch.txt 2>&1
for rep in 1 2; do OMP_NUM_THREADS=4 taskset -c 8-11 python3 $S 30 > $R/alone-$rep.md 2>&1; done
for c in 0-3 4-7 8-11 12-15; do OMP_NUM_THREADS=4 taskset -c $c python3 $S 30 > $R/together-$c.md 2>&1 & done; wait
head -3 $R/torch.txt; cat $R/alone-1.md $R/alone-2.md $R/together-8-11.md
