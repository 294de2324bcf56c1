"""Generated stand-ins, in the original formats, for everything the paper's recipe reads, at the
real shapes (`full`) or tiny ones (`tiny`): what `reproduce-paper.sh --rehearse` runs on.

  python3 rehearsal_data.py full|tiny DIR ASTRA_TRAIN

Writes under DIR (standard library only; the models through `astra-train init`, random weights):
  models/vit-in21k, models/vit-imagenet, models/gpt2, models/gpt2-medium   HF folders
      (full: ViT-B/16 at 224² with 21,843 / 1,000 labels, GPT-2 small and medium at 1024 positions)
  cifar100/cifar-100-binary/{train,test}.bin   CIFAR-100 binary records, full: the real 50,000 / 10,000
  imagenet/{train,val}/<wnid>/*.png            an ImageNet-style folder, full: 1,000 classes
      (2 train and 1 val image each: the rehearsal trains a few hundred steps over them)
  wikitext-103-raw/wiki.{train,valid,test}.raw  WikiText-103 raw layout of random words, full: a
      24 MB training file (the real one is 541 MB: loading time is projected from it) and
      validation/test files of the real sizes (1.1 / 1.3 MB)
  wikipedia/20231101.en/train-*.parquet  wikimedia/wikipedia's layout (id, url, title, text),
      random-word articles; full: 8 shards of 2,500 (the real 41 shards hold 6.41 M articles;
      the recipe samples 1 M: tokenizing is projected from the rehearsal's rate)
  sizes.json   the real data sizes the report projects to
"""
import json
import os
import random
import struct
import subprocess
import sys
import zlib

SHAPES = {
    "full": dict(vit=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, image_size=224, patch_size=16),
                 gpt2=dict(n_embd=768, n_layer=12, n_head=12), gpt2_medium=dict(n_embd=1024, n_layer=24, n_head=16),
                 positions=1024, cifar=(50_000, 10_000), imagenet=(1000, 2, 1, 256), text_mb=(24, 1.1, 1.3),
                 wiki=(8, 2500)),
    "tiny": dict(vit=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64, image_size=32, patch_size=8),
                 gpt2=dict(n_embd=32, n_layer=2, n_head=2), gpt2_medium=dict(n_embd=64, n_layer=3, n_head=4),
                 positions=64, cifar=(256, 64), imagenet=(3, 8, 4, 40), text_mb=(0.06, 0.015, 0.015),
                 wiki=(2, 150)),
}
# What the report projects to: the real data sets (images, or whitespace words for text, whose
# GPT-2 BPE token counts are WikiText-103's published 103M / 217k / 245k).
REAL = {"cifar100": {"train": 50_000, "test": 10_000},
        "imagenet": {"train": 1_281_167, "val": 50_000},
        "wikitext103": {"train_tokens": 117_900_000, "valid_tokens": 246_000, "test_tokens": 281_000,
                        "train_mb": 541},
        # 20231101.en: 6,407,814 articles in 41 shards; ≈ 20 GB of text (≈ 3.1 kB per article).
        # The recipe samples 1 M of them; held out: 0.5% capped at 5,000 articles per split.
        "wikipedia": {"articles": 6_407_814, "train_docs": 1_000_000, "held_out_docs": 5_000,
                      "bytes_per_article": 3_100}}


def vit_config(shape, labels):
    return {"architectures": ["ViTForImageClassification"], "model_type": "vit", "num_channels": 3,
            "hidden_act": "gelu", "layer_norm_eps": 1e-12, "qkv_bias": True,
            "id2label": {str(i): f"class_{i}" for i in range(labels)}, **shape}


def gpt2_config(shape, positions):
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257,
            "n_positions": positions, "n_ctx": positions, "layer_norm_epsilon": 1e-5,
            "activation_function": "gelu_new", **shape}


def init(astra_train, cfg, out):
    if os.path.exists(os.path.join(out, "config.json")):
        return
    path = out + ".config.json"
    with open(path, "w") as f:
        json.dump(cfg, f)
    subprocess.run([astra_train, "init", "--model-config", path, "--out", out], check=True,
                   stdout=subprocess.DEVNULL)
    os.remove(path)


def cifar(d, train, test):
    d = os.path.join(d, "cifar100", "cifar-100-binary")
    os.makedirs(d, exist_ok=True)
    for split, count in (("train", train), ("test", test)):
        with open(os.path.join(d, f"{split}.bin.tmp"), "wb") as f:
            for start in range(0, count, 1000):
                recs = []
                for i in range(start, min(count, start + 1000)):
                    fine = i % 100
                    recs.append(bytes([fine // 5, fine]) + os.urandom(3072))
                f.write(b"".join(recs))
        os.replace(os.path.join(d, f"{split}.bin.tmp"), os.path.join(d, f"{split}.bin"))


def png(path, w, h):
    """An 8-bit RGB PNG of random pixels (stored, not compressed: random data does not shrink)."""
    raw = b"".join(b"\x00" + os.urandom(w * 3) for _ in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 0)) + chunk(b"IEND", b""))


def imagenet(d, classes, train, val, side):
    for split, per_class in (("train", train), ("val", val)):
        for c in range(classes):
            cd = os.path.join(d, "imagenet", split, f"n{c:08d}")
            os.makedirs(cd, exist_ok=True)
            for i in range(per_class):
                png(os.path.join(cd, f"n{c:08d}_{i}.png"), side + 37 * (i % 3), side)


WORDS = ("the of and in to a was is for as on with by he that at from his it an were are which "
         "this be first had not their but one new after who they have her she two been other when "
         "there all during into school time may years more most only over city some world would "
         "where later up such used many can state about national out known university united then "
         "made").split()


def wikitext(d, sizes_mb):
    d = os.path.join(d, "wikitext-103-raw")
    os.makedirs(d, exist_ok=True)
    seed = int.from_bytes(os.urandom(8), "little")
    for split, mb in zip(("train", "valid", "test"), sizes_mb):
        target, n, parts = int(mb * 1e6), 0, []
        while n < target:
            if len(parts) % 40 == 0:
                parts.append(f"\n = Section {len(parts)} = \n\n")
            para = []
            for _ in range(80):
                seed = (seed * 6364136223846793005 + 1442695040888963407) % 2**64
                para.append(WORDS[(seed >> 33) % len(WORDS)])
            parts.append(" " + " ".join(para) + " . \n")
            n += len(parts[-1])
        with open(os.path.join(d, f"wiki.{split}.raw"), "w") as f:
            f.write("".join(parts))


# A minimal Parquet writer (no pyarrow here): required BYTE_ARRAY (UTF8) columns, one row group
# and one PLAIN, uncompressed data page per column; the footer in Thrift's compact protocol.
def _varint(n):
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _zigzag(n):
    return _varint((n << 1) ^ (n >> 63))


def _struct(fields):
    """fields: [(id, kind, value)] in id order; kind i32/i64/bin/list_i32/list_bin/list_struct/struct."""
    out, last = bytearray(), 0
    codes = {"i32": 5, "i64": 6, "bin": 8, "struct": 12}
    for fid, kind, v in fields:
        code = codes.get(kind, 9)
        out.append(((fid - last) << 4) | code)
        last = fid
        if kind in ("i32", "i64"):
            out += _zigzag(v)
        elif kind == "bin":
            b = v.encode() if isinstance(v, str) else v
            out += _varint(len(b)) + b
        elif kind == "struct":
            out += v
        else:  # lists
            elem = {"list_i32": 5, "list_bin": 8, "list_struct": 12}[kind]
            out.append((len(v) << 4) | elem if len(v) < 15 else 0xF0 | elem)
            if len(v) >= 15:
                out += _varint(len(v))
            for x in v:
                if elem == 5:
                    out += _zigzag(x)
                elif elem == 8:
                    b = x.encode()
                    out += _varint(len(b)) + b
                else:
                    out += x
    return bytes(out) + b"\x00"


def parquet_shard(path, columns):
    """columns: {name: [str, ...]} of equal lengths, written as required UTF8 columns."""
    rows = len(next(iter(columns.values())))
    body, chunks = bytearray(b"PAR1"), []
    for name, values in columns.items():
        data = b"".join(struct.pack("<I", len(b)) + b for b in (v.encode() for v in values))
        header = _struct([(1, "i32", 0), (2, "i32", len(data)), (3, "i32", len(data)),
                          (5, "struct", _struct([(1, "i32", rows), (2, "i32", 0), (3, "i32", 3), (4, "i32", 3)]))])
        offset = len(body)
        body += header + data
        meta = _struct([(1, "i32", 6), (2, "list_i32", [0]), (3, "list_bin", [name]), (4, "i32", 0),
                        (5, "i64", rows), (6, "i64", len(header) + len(data)), (7, "i64", len(header) + len(data)),
                        (9, "i64", offset)])
        chunks.append(_struct([(2, "i64", offset), (3, "struct", meta)]))
    schema = [_struct([(4, "bin", "schema"), (5, "i32", len(columns))])]
    schema += [_struct([(1, "i32", 6), (3, "i32", 0), (4, "bin", n), (6, "i32", 0)]) for n in columns]
    group = _struct([(1, "list_struct", chunks), (2, "i64", len(body) - 4), (3, "i64", rows)])
    footer = _struct([(1, "i32", 1), (2, "list_struct", schema), (3, "i64", rows), (4, "list_struct", [group]),
                      (6, "bin", "astra rehearsal_data.py")])
    with open(path + ".tmp", "wb") as f:
        f.write(bytes(body) + footer + struct.pack("<I", len(footer)) + b"PAR1")
    os.replace(path + ".tmp", path)


def wikipedia(d, shards, per_shard):
    """wikimedia/wikipedia's 20231101.en layout: train-0000i-of-0000n.parquet with id, url, title,
    text; articles of random words, 1–4 kB like the real ones."""
    d = os.path.join(d, "wikipedia", "20231101.en")
    os.makedirs(d, exist_ok=True)
    rng = random.Random(int.from_bytes(os.urandom(8), "little"))
    for s in range(shards):
        ids = [str(s * per_shard + i) for i in range(per_shard)]
        texts = [f"Article {i}\n\n" + " ".join(rng.choices(WORDS, k=rng.randint(200, 800))) + "." for i in ids]
        parquet_shard(os.path.join(d, f"train-{s:05d}-of-{shards:05d}.parquet"),
                      {"id": ids, "url": [f"https://en.wikipedia.org/wiki?curid={i}" for i in ids],
                       "title": [f"Article {i}" for i in ids], "text": texts})


def main():
    if len(sys.argv) != 4 or sys.argv[1] not in SHAPES:
        sys.exit("usage: rehearsal_data.py full|tiny DIR ASTRA_TRAIN")
    mode, d, astra_train = sys.argv[1:]
    s = SHAPES[mode]
    os.makedirs(os.path.join(d, "models"), exist_ok=True)
    init(astra_train, vit_config(s["vit"], 21_843 if mode == "full" else 5), os.path.join(d, "models", "vit-in21k"))
    init(astra_train, vit_config(s["vit"], 1000 if mode == "full" else 3), os.path.join(d, "models", "vit-imagenet"))
    init(astra_train, gpt2_config(s["gpt2"], s["positions"]), os.path.join(d, "models", "gpt2"))
    init(astra_train, gpt2_config(s["gpt2_medium"], s["positions"]), os.path.join(d, "models", "gpt2-medium"))
    cifar(d, *s["cifar"])
    imagenet(d, *s["imagenet"])
    wikitext(d, s["text_mb"])
    wikipedia(d, *s["wiki"])
    with open(os.path.join(d, "sizes.json"), "w") as f:
        json.dump({"mode": mode, "real": REAL, "generated": {"cifar100": s["cifar"],
                   "imagenet_classes_train_val_side": s["imagenet"], "wikitext_mb": s["text_mb"],
                   "wikipedia_shards_articles": s["wiki"]}}, f, indent=1)
    print(f"rehearsal data ({mode}) in {d}")


if __name__ == "__main__":
    main()
