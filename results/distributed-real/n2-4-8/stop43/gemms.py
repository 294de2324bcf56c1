"""The GEMMs of a 12-block ViT-B forward with each block's own (cold) weights, at M = 1025 rows
(single device + CLS) and 257 (a share of 4 + CLS): F.linear (MKL packs the weights per call),
MKL with the weights packed once (_mkl_linear), oneDNN with the weights reordered once. Per
variant: ms per forward (12 blocks: q, k, v, out, fc1, fc2), median of REPS, interleaved."""
import sys, time, statistics as st
import torch, torch.nn.functional as F
torch.manual_seed(0)
REPS = int(sys.argv[1]) if len(sys.argv) > 1 else 10
D, MLP, L = 768, 3072, 12
shapes = [(D, D), (D, D), (D, D), (D, D), (D, MLP), (MLP, D)]  # (in, out)
blocks = [[(torch.randn(o, i) * 0.02, torch.zeros(o)) for i, o in shapes] for _ in range(L)]
def variants(m):
    packed = [[(torch.ops.mkl._mkl_reorder_linear_weight(w, m), w, b) for w, b in blk] for blk in blocks]
    dnn = [[(w.to_mkldnn(), b.to_mkldnn()) for w, b in blk] for blk in blocks]
    xs = {i: torch.randn(m, i) for i in (D, MLP)}
    def plain():
        for blk in blocks:
            for w, b in blk: F.linear(xs[w.shape[1]], w, b)
    def mkl():
        for blk in packed:
            for p, w, b in blk: torch.ops.mkl._mkl_linear(xs[w.shape[1]], p, w, b, m)
    xd = {i: x.to_mkldnn() for i, x in xs.items()}
    def onednn():
        for blk, raw in zip(dnn, blocks):
            for (w, b), (w0, _) in zip(blk, raw): torch._C._nn.mkldnn_linear(xd[w0.shape[1]], w, b).to_dense()
    return {"F.linear": plain, "mkl packed once": mkl, "oneDNN reordered once": onednn}
res = {}
with torch.no_grad():
    for m in (1025, 257):
        v = variants(m)
        for f in v.values(): f()
        ts = {n: [] for n in v}
        for _ in range(REPS):
            for n, f in v.items():
                t = time.perf_counter(); f(); ts[n].append(time.perf_counter() - t)
        flops = 2 * m * L * sum(i * o for i, o in shapes)
        for n in v:
            med = st.median(ts[n]); res[(n, m)] = (med * 1e3, flops / med / 1e9)
print(f"threads {torch.get_num_threads()}, median of {REPS}, 12 blocks' GEMMs, cold weights")
print("| variant | M=1025 ms | GFLOP/s | M=257 ms | GFLOP/s | ratio 1025/257 |")
print("|---|---:|---:|---:|---:|---:|")
for n in ("F.linear", "mkl packed once", "oneDNN reordered once"):
    a, b = res[(n, 1025)], res[(n, 257)]
    print(f"| {n} | {a[0]:.1f} | {a[1]:.0f} | {b[0]:.1f} | {b[1]:.0f} | {a[0]/b[0]:.2f} |")
