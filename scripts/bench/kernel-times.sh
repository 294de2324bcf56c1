#!/usr/bin/env bash
# A kernel timeline of any CUDA process (ours through tch/libtorch, or PyTorch's), where nsys is not
# installed: a CUPTI injection library (kernel_times.c) records every kernel, copy and memset.
#   scripts/bench/kernel-times.sh build DIR       (here: downloads CUDA 13.0's CUPTI, runtime and
#                                                   crt headers from PyPI, builds DIR/libkernel_times.so)
#   scripts/bench/kernel-times.sh run DIR TRACE.csv COMMAND...   (on the GPU machine, after
#                                                   `source .gpu/env.sh`; CUPTI from torch's wheels)
#   python3 scripts/bench/kernel_times.py TRACE.csv [TOP]   (one step's kernels, summed by name)
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cmd=${1:?usage: kernel-times.sh build DIR | run DIR TRACE.csv COMMAND...}
dir=${2:?a directory for the library}
case $cmd in
build)
  mkdir -p "$dir/wheels"
  for p in nvidia-cuda-cupti nvidia-cuda-runtime nvidia-cuda-crt; do
    pip download -q --no-deps "$p>=13.0,<13.1" --only-binary=:all: -d "$dir/wheels"
  done
  for w in "$dir"/wheels/*.whl; do python3 -m zipfile -e "$w" "$dir/wheels/x"; done
  inc=$dir/wheels/x/nvidia/cu13/include lib=$dir/wheels/x/nvidia/cu13/lib
  gcc -O2 -shared -fPIC -I"$inc" "$here/kernel_times.c" -o "$dir/libkernel_times.so" \
    -L"$lib" -l:libcupti.so.13
  cp "$lib/libcupti.so.13" "$dir/"
  echo "built $dir/libkernel_times.so"
  ;;
run)
  trace=${3:?the trace to write}
  shift 3
  torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "lib"))')
  # torch's own CUPTI first (it matches the driver the wheels were built for), ours after.
  LD_LIBRARY_PATH="$torch_lib:$(cd "$dir" && pwd):${LD_LIBRARY_PATH:-}" \
    CUDA_INJECTION64_PATH="$(cd "$dir" && pwd)/libkernel_times.so" KERNEL_TIMES_OUT="$trace" "$@"
  ;;
*) echo "kernel-times.sh: unknown command $cmd (build or run)" >&2; exit 2 ;;
esac
