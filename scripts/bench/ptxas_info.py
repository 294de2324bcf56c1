"""Registers, spills and shared memory of every kernel in one of our CUDA sources, without a GPU:
NVRTC (from PyTorch's CUDA wheels, as the trainer loads it) compiles the source for a real
architecture with ptxas's report on, and this prints the report.

  .venv/bin/python scripts/bench/ptxas_info.py astra-train/src/cuda/nearest.rs TENSOR_CORE_SOURCE [sm_90]

The source is the `text: r#"…"#` of the named `Source` constant in the Rust file.
"""
import ctypes
import glob
import os
import re
import sys

if len(sys.argv) < 3:
    sys.exit(__doc__)
path, const = sys.argv[1], sys.argv[2]
arch = sys.argv[3] if len(sys.argv) > 3 else "sm_90"
rust = open(path).read()
found = re.search(rf"\bconst {re.escape(const)}: Source", rust)
at = found.start() if found else -1
if at < 0:
    sys.exit(f"ptxas_info.py: no `{const}: Source` in {path}")
text = rust[rust.index('text: r#"', at) + len('text: r#"'):]
text = text[: text.index('"#,')]

import torch  # noqa: E402  (only to find the wheels' CUDA libraries beside it)

lib = os.path.join(os.path.dirname(torch.__file__), "..", "nvidia", "cu13", "lib")
for f in sorted(glob.glob(os.path.join(lib, "libnvrtc-builtins.so*"))):
    try:
        ctypes.CDLL(f, mode=ctypes.RTLD_GLOBAL)
        break
    except OSError:
        pass
nvrtcs = sorted(glob.glob(os.path.join(lib, "libnvrtc.so*")))
if not nvrtcs:
    sys.exit(f"ptxas_info.py: no libnvrtc.so in {lib}")
nv = ctypes.CDLL(nvrtcs[0])
prog = ctypes.c_void_p()
if nv.nvrtcCreateProgram(ctypes.byref(prog), text.encode(), b"kernel.cu", 0, None, None) != 0:
    sys.exit("ptxas_info.py: nvrtcCreateProgram failed")
opts = [f"--gpu-architecture={arch}".encode(), b"-std=c++17", b"--ptxas-options=-v"]
rc = nv.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
size = ctypes.c_size_t()
nv.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nv.nvrtcGetProgramLog(prog, log)
for line in log.value.decode().splitlines():
    if rc != 0 or any(k in line for k in ("Compiling entry", "registers", "spill")):
        print(line)
sys.exit(1 if rc != 0 else 0)
