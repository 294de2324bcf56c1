"""Fashion-MNIST images -> 4x4 patch vectors (the tokens a patch-4 ViT would embed), as .npy.

  python patches.py DIR OUT_DIR [--patch 4]

Reads the IDX files (gzip or plain) and checks their headers; writes train.npy and test.npy
(float32, rows of patch*patch pixels scaled to [0, 1]).
"""
import argparse, gzip, os, struct, sys

import numpy as np


def read_idx(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        sys.exit(f"{path}: too short for an IDX file")
    magic, count = struct.unpack(">II", data[:8])
    if magic == 2051:
        rows, cols = struct.unpack(">II", data[8:16])
        body = np.frombuffer(data, np.uint8, offset=16)
        if body.size != count * rows * cols:
            sys.exit(f"{path}: header says {count}x{rows}x{cols} images, file holds {body.size} bytes")
        return body.reshape(count, rows, cols)
    sys.exit(f"{path}: magic {magic} is not an IDX image file (2051)")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir"); p.add_argument("out"); p.add_argument("--patch", type=int, default=4)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for split, name in [("train", "train-images-idx3-ubyte.gz"), ("test", "t10k-images-idx3-ubyte.gz")]:
        path = os.path.join(a.dir, name)
        if not os.path.exists(path) and os.path.exists(path[:-3]):
            path = path[:-3]
        img = read_idx(path).astype(np.float32) / 255.0
        n, h, w = img.shape
        s = a.patch
        patches = img.reshape(n, h // s, s, w // s, s).transpose(0, 1, 3, 2, 4).reshape(-1, s * s)
        np.save(os.path.join(a.out, f"{split}.npy"), np.ascontiguousarray(patches))
        print(f"{split}: {n} images -> {patches.shape[0]} patches of {s}x{s}")


if __name__ == "__main__":
    main()
