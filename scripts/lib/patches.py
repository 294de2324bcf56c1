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
    if magic == 2049:
        body = np.frombuffer(data, np.uint8, offset=8)
        if body.size != count:
            sys.exit(f"{path}: header says {count} labels, file holds {body.size} bytes")
        return body
    sys.exit(f"{path}: magic {magic} is not an IDX image (2051) or label (2049) file")


def idx_path(folder, name):
    """`name` (gzip) in `folder`, or its unpacked twin when only that exists."""
    path = os.path.join(folder, name)
    if not os.path.exists(path) and os.path.exists(path[:-3]):
        path = path[:-3]
    return path


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dir"); p.add_argument("out"); p.add_argument("--patch", type=int, default=4)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    for split, name in [("train", "train-images-idx3-ubyte.gz"), ("test", "t10k-images-idx3-ubyte.gz")]:
        img = read_idx(idx_path(a.dir, name)).astype(np.float32) / 255.0
        n, h, w = img.shape
        s = a.patch
        patches = img.reshape(n, h // s, s, w // s, s).transpose(0, 1, 3, 2, 4).reshape(-1, s * s)
        np.save(os.path.join(a.out, f"{split}.npy"), np.ascontiguousarray(patches))
        print(f"{split}: {n} images -> {patches.shape[0]} patches of {s}x{s}")


if __name__ == "__main__":
    main()
