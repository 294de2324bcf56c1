"""Peer side of scripts/bench-kmeans.sh: data generation, faiss.Kmeans, and the common objective.

  python kmeans_faiss.py data  --n N --d D --centers C --seed S --out x.npy
  python kmeans_faiss.py faiss --input x.npy --k K --iters I --seed S --threads T --out faiss.npy --report r.json
  python kmeans_faiss.py objective --input x.npy --centroids A.npy|A.safetensors --threads T

The objective is the mean over ALL rows of the squared distance to the nearest centroid, computed
the same way for both sides: exact search with faiss.IndexFlatL2, summed in float64.
"""
import argparse, json, sys, time

import numpy as np


def gaussian_mixture(n, d, centers, seed):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d), dtype=np.float32)
    which = rng.integers(0, centers, size=n)
    x = c[which] + 0.3 * rng.standard_normal((n, d), dtype=np.float32)
    return np.ascontiguousarray(x, dtype=np.float32)


def load_centroids(path):
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file
        cb = load_file(path)["blocks.0.codebook"]
        assert cb.shape[0] == 1, "benchmark codebooks have one group"
        return np.ascontiguousarray(cb[0])
    return np.load(path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("cmd", choices=["data", "faiss", "objective"])
    p.add_argument("--n", type=int); p.add_argument("--d", type=int); p.add_argument("--centers", type=int)
    p.add_argument("--seed", type=int, default=1); p.add_argument("--k", type=int); p.add_argument("--iters", type=int)
    p.add_argument("--threads", type=int, default=1); p.add_argument("--input"); p.add_argument("--out")
    p.add_argument("--report"); p.add_argument("--centroids")
    a = p.parse_args()
    if a.cmd == "data":
        np.save(a.out, gaussian_mixture(a.n, a.d, a.centers, a.seed))
        return
    import faiss
    faiss.omp_set_num_threads(a.threads)
    x = np.load(a.input, mmap_mode="r")
    x = np.ascontiguousarray(x)
    if a.cmd == "faiss":
        km = faiss.Kmeans(x.shape[1], a.k, niter=a.iters, seed=a.seed, max_points_per_centroid=256, verbose=False)
        t = time.perf_counter()
        km.train(x)
        secs = time.perf_counter() - t
        np.save(a.out, km.centroids)
        json.dump({"fit_seconds": secs, "iterations": len(km.iteration_stats), "faiss_version": faiss.__version__},
                  open(a.report, "w"))
        return
    c = load_centroids(a.centroids)
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(c)
    total = 0.0
    for s in range(0, x.shape[0], 65536):
        dist, _ = index.search(x[s:s + 65536], 1)
        total += float(dist[:, 0].astype(np.float64).sum())
    print(f"{total / x.shape[0]:.9e}")


if __name__ == "__main__":
    sys.exit(main())
