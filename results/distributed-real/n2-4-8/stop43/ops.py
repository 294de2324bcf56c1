"""Per-op CPU timings of one ViT-B block at M = 1024 rows (the single device) and M = 257 (one of
4 devices' shares, attending to 1,024 keys): the GEMMs as F.linear (MKL, weights packed per
call), MKL with weights packed once (_mkl_linear), oneDNN with weights reordered once; SDPA;
the VQ encode. Median of REPS interleaved repetitions; prints a table. Threads: torch default
(OMP_NUM_THREADS)."""
import sys, time, statistics as st
import torch, torch.nn.functional as F
torch.manual_seed(0)
REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 20
D, H, MLP, K = 768, 12, 3072, 1024
shapes = {"qkv sep (3x768)": None, "qkv fused 2304": (D, 3 * D), "o 768": (D, D), "fc1 3072": (D, MLP), "fc2 768": (MLP, D)}
W = {n: (torch.randn(o, i) * 0.02, torch.zeros(o)) for n, s in shapes.items() if s for i, o in [s]}
Wq = [(torch.randn(D, D) * 0.02, torch.zeros(D)) for _ in range(3)]
def packs(w, b, m):
    return torch.ops.mkl._mkl_reorder_linear_weight(w, m), w.to_mkldnn(), b.to_mkldnn() if False else b
rows = {}
def bench(name, m, fn, flops):
    for _ in range(2): fn()
    ts = []
    for _ in range(REPS):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    med = st.median(ts)
    rows.setdefault(name, {})[m] = (med * 1e3, flops / med / 1e9)
with torch.no_grad():
    for m in (1024, 257):
        x = torch.randn(1, m, D); xm = x.view(m, D)
        for n, (w, b) in W.items():
            i, o = w.shape[1], w.shape[0]
            xi = torch.randn(m, i)
            pw = torch.ops.mkl._mkl_reorder_linear_weight(w, m)
            dw = w.to_mkldnn()
            f = 2 * m * i * o
            bench(f"{n} F.linear", m, lambda: F.linear(xi, w, b), f)
            bench(f"{n} mkl packed", m, lambda: torch.ops.mkl._mkl_linear(xi, pw, w, b, m), f)
            bench(f"{n} onednn", m, lambda: torch._C._nn.mkldnn_linear(xi.to_mkldnn(), dw, b.to_mkldnn()).to_dense(), f)
        f = 3 * 2 * m * D * D
        bench("qkv sep (3x768) F.linear", m, lambda: [F.linear(xm, w, b) for w, b in Wq], f)
        q = torch.randn(1, H, m, 64); k = torch.randn(1, H, 1024, 64); v = torch.randn(1, H, 1024, 64)
        bench("sdpa", m, lambda: F.scaled_dot_product_attention(q, k, v), 4 * H * m * 1024 * 64)
        qs = torch.randn(1, m, H, 64).transpose(1, 2)
        ks = torch.randn(1, 1024, H, 64).transpose(1, 2); vs = torch.randn(1, 1024, H, 64).transpose(1, 2)
        bench("sdpa strided (as the model)", m, lambda: F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).contiguous(), 4 * H * m * 1024 * 64)
        cb = torch.randn(1, K, D); cn = (cb ** 2).sum(-1).view(1, 1, K)
        bench("encode (baddbmm+argmin)", m, lambda: torch.baddbmm(cn, xm.view(1, m, D), cb.transpose(1, 2), beta=1, alpha=-2).argmin(-1), 2 * m * K * D)
        h = torch.randn(1, m, MLP)
        bench("gelu", m, lambda: F.gelu(h), m * MLP)
        bench("layer_norm", m, lambda: F.layer_norm(x, (D,)), m * D)
print(f"threads {torch.get_num_threads()}, median of {REPS}: ms (GFLOP/s)")
print("| op | M=1024 ms | GFLOP/s | M=257 ms | GFLOP/s | 1024/257 time |")
print("|---|---:|---:|---:|---:|---:|")
for n, r in rows.items():
    a, b = r[1024], r[257]
    print(f"| {n} | {a[0]:.3f} | {a[1]:.0f} | {b[0]:.3f} | {b[1]:.0f} | {a[0]/b[0]:.2f} |")
