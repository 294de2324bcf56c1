#!/usr/bin/env bash
# Idempotent set-up of libtorch 2.11.0 for the workspace (tch 0.24.0 is built against exactly it).
#
#   scripts/setup.sh            # project venv .venv with torch==2.11.0 from PyPI (CUDA 13 build; runs on CPU too)
#   LIBTORCH=/opt/libtorch scripts/setup.sh   # use an existing libtorch 2.11 and skip the venv
#
# Either way it links .libtorch to that libtorch; .cargo/config.toml points LIBTORCH at .libtorch and
# the build scripts add an rpath to .libtorch/lib, so `cargo build` and the binaries need nothing
# exported by hand. The venv also gets numpy, safetensors and transformers, which the interop and
# parity tests use.
# Pip's cache (~/.cache/pip) is used when present, so a second machine set-up does not re-download.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TORCH_VERSION=2.11.0
die() { echo "setup: $*" >&2; exit 1; }

torch_version_of() { # $1 = libtorch root (a pip torch package or an unpacked libtorch zip)
  if [[ -f $1/build-version ]]; then cut -d+ -f1 <"$1/build-version"
  elif [[ -f $1/version.py ]]; then sed -n "s/^__version__ = ['\"]\([^'\"+]*\).*/\1/p" "$1/version.py"
  else echo unknown; fi
}

py=.venv/bin/python
if ! [[ -x $py ]]; then
  command -v python3 >/dev/null || die "python3 not found: install Python 3 (apt-get install python3 python3-venv)"
  python3 -m venv .venv || die "python3 -m venv failed: install python3-venv (apt-get install python3-venv)"
fi
pip_install() { $py -m pip install --disable-pip-version-check -q "$@"; }

# numpy and safetensors: the interop tests read our files with them; transformers: the parity tests
# compare our models with HF's (CPU, tiny random models); scipy: its savemat writes the MATLAB
# fixture of ImageNet's devkit (meta.mat) in the data tests.
$py -c "import numpy, safetensors, transformers, scipy" 2>/dev/null || pip_install numpy safetensors transformers scipy ||
  die "pip could not install numpy, safetensors, transformers and scipy into .venv"

if [[ -n ${LIBTORCH:-} && ${LIBTORCH%/} != "$PWD/.libtorch" && ${LIBTORCH%/} != .libtorch ]]; then
  target=${LIBTORCH%/}
  [[ -f $target/lib/libtorch_cpu.so ]] ||
    die "LIBTORCH=$target has no lib/libtorch_cpu.so: point LIBTORCH at a libtorch $TORCH_VERSION directory, or unset it to use the project venv"
else
  if ! $py -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
    echo "setup: installing torch==$TORCH_VERSION into .venv (about 3.5 GB the first time; pip's cache is reused)"
    pip_install "torch==$TORCH_VERSION" ||
      die "pip could not install torch==$TORCH_VERSION: check network access to PyPI, or set LIBTORCH to an existing libtorch $TORCH_VERSION"
  fi
  target=$($py -c 'import os, torch; print(os.path.dirname(torch.__file__))')
fi

version=$(torch_version_of "$target")
[[ $version == "$TORCH_VERSION" ]] ||
  die "libtorch at $target is version $version but tch 0.24 needs $TORCH_VERSION: run scripts/setup.sh without LIBTORCH (project venv) or point LIBTORCH at libtorch $TORCH_VERSION"
ln -sfn "$target" .libtorch
cuda=no
[[ -f $target/lib/libtorch_cuda.so ]] && cuda=yes
echo "setup: libtorch $version at $target (linked as .libtorch; CUDA libraries: $cuda)"
