"""Which int8 linear kernels libtorch's CPU build offers, and what they are worth against fp32,
at ViT-B/GPT-2-small shapes (for issue 23's "real int8 kernels where libtorch has them").

  .venv/bin/python scripts/bench/int8_cpu_kernels.py [THREADS]

Rows: fp32 F.linear; fbgemm/x86 dynamic int8 (`quantized::linear_dynamic`, what
torch.ao's quantize_dynamic runs: int8 weights per channel × int8 activations per tensor); and
`aten::_weight_int8pack_mm` (int8 weights, float activations), the only int8 linear that tch 0.24
exposes (`Tensor::internal_weight_int8pack_mm`), with fp32 and bf16 activations. Median of 20 runs.
Prints a markdown table; relative error is ‖y − y_fp32‖ / ‖y_fp32‖.
"""
import statistics
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
torch.manual_seed(0)


def ms(f):
    f()
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        f()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, quantized engine {torch.backends.quantized.engine}\n")
print("| rows × in → out | fp32 linear | dynamic int8 (fbgemm) | int8pack, fp32 act. | int8pack, bf16 act. | rel. error: dynamic / int8pack |")
print("|---|---:|---:|---:|---:|---|")
with torch.no_grad():
    for m, k, n in [(197, 768, 3072), (197, 3072, 768), (1024, 768, 768), (256, 768, 2304), (16, 768, 3072)]:
        lin = torch.nn.Linear(k, n)
        lin.weight.data.normal_(0, 0.02)
        x = torch.randn(m, k)
        dq = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        w = lin.weight.data
        s = w.abs().amax(1) / 127
        q = torch.round(w / s[:, None]).clamp(-127, 127).to(torch.int8)
        xb, sb = x.bfloat16(), s.bfloat16()
        y = lin(x)
        rel = lambda z: ((z.float() - y).norm() / y.norm()).item()
        e_dyn = rel(dq(x))
        e_pack = rel(torch._weight_int8pack_mm(x, q, s) + lin.bias)
        print(f"| {m} × {k} → {n} | {ms(lambda: lin(x)):.2f} ms | {ms(lambda: dq(x)):.2f} ms | "
              f"{ms(lambda: torch._weight_int8pack_mm(x, q, s)):.2f} ms | {ms(lambda: torch._weight_int8pack_mm(xb, q, sb)):.2f} ms | "
              f"{e_dyn:.4f} / {e_pack:.5f} |")
