#!/usr/bin/env bash
# Call 1 (stop 40): OpenMP binding A/B on CPU workers, GPU profile of a share, GPU workers (and MPS if there)
set -u
source .gpu/env.sh
R=/tmp/r; mkdir -p $R
save() { tar czf $OUT/c1.tar.gz.part -C $R . && mv $OUT/c1.tar.gz.part $OUT/c1.tar.gz; }
{
echo "== machine"; lscpu | grep -E "Model name|^CPU\(s\)|Thread|Socket|NUMA"; nvidia-smi --query-gpu=name,driver_version,compute_mode --format=csv
echo "== mps"; command -v nvidia-cuda-mps-control; ls /usr/local/nvidia/bin /usr/bin 2>/dev/null | grep -i -E "mps|nvidia" | head
git log --oneline -1 2>/dev/null || cat .gpu/HEAD 2>/dev/null
} > $R/machine.txt 2>&1
common=(BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 DEVICES=4 TOKENS=1024 MBPS=10 VQ_GROUPS=1 MULTICAST_GROUPS= SP_MBPS=" " RUNS=5)
t0=$(date +%s)
for rep in 1 2; do for pin in 1 2; do
  env "${common[@]}" PIN=$pin scripts/bench/distributed-real.sh $R/cpu-pin$pin-rep$rep > $R/cpu-pin$pin-rep$rep.log 2>&1
  echo "cpu pin=$pin rep=$rep done at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save
done; done
# A device's share alone, bound like a worker (OMP_PLACES on cores 0-3), and the single device
for b in 0 1; do
  if [[ $b == 1 ]]; then export OMP_PLACES="{0},{1},{2},{3}" OMP_PROC_BIND=close; fi
  OMP_NUM_THREADS=4 taskset -c 0-3 .gpu/bin/astra-eval profile --fast --methods single,astra-g1 --devices 4 --tokens 1024 --runs 5 --out $R/profile-cpu-bind$b > $R/profile-cpu-bind$b.log 2>&1
  unset OMP_PLACES OMP_PROC_BIND
done
echo "profiles cpu done at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save
# Uncontended share on the GPU (what astra-sim would need for a shared-accelerator model)
for arch in encoder gpt2; do
  .gpu/bin/astra-eval profile --device cuda --fast --arch $arch --methods single,astra-g1,astra-g16,astra-g32 --devices 2,4,8 --tokens 1024 --runs 10 --out $R/profile-cuda-$arch > $R/profile-cuda-$arch.log 2>&1
done
echo "profiles cuda done at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save
gpu=(BIN=.gpu/bin PYTHON=python3 SHAPER=user CORES=16 WORKER_DEVICE=cuda DEVICES=4 TOKENS=1024 GPT2_TOKENS=1024 MBPS=100 VQ_GROUPS=1 MULTICAST_GROUPS= SP_MBPS=" ")
env "${gpu[@]}" scripts/bench/distributed-real.sh $R/gpu > $R/gpu.log 2>&1
echo "gpu workers done at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save
if command -v nvidia-cuda-mps-control >/dev/null; then
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
  nvidia-cuda-mps-control -d && echo "mps started" >> $R/progress.txt; save
  env "${gpu[@]}" scripts/bench/distributed-real.sh $R/gpu-mps > $R/gpu-mps.log 2>&1
  echo quit | nvidia-cuda-mps-control
  cp -r /tmp/mps-log $R/ 2>/dev/null
  echo "gpu workers under mps done at $(( $(date +%s) - t0 )) s" >> $R/progress.txt; save
fi
tar czf $OUT/c1.tar.gz -C $R .
cat $R/progress.txt $R/machine.txt
for d in $R/cpu-pin*; do echo "== $d"; grep -E "^\| 1024" $d/table.md | cut -d'|' -f2-9; done
