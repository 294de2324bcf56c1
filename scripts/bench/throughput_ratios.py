"""gpu-throughput.sh's table (markdown) → the figure's CSV: ours / HF transformers eager with the
fused AdamW, per model, as `group,bar,value` for `astra-sim plot-bars`.

  python3 throughput_ratios.py OUT.md > OUT-vs-pytorch.csv
"""
import re
import sys

groups = {"## ViT-B/16": "ViT-B/16 224² b128", "## GPT-2 small": "GPT-2 small 1024 b8"}
section, ms = None, {}
for line in open(sys.argv[1]):
    for head, name in groups.items():
        if line.startswith(head):
            section = name
    m = re.match(r"\|\s*(.+?)\s*\|\s*([\d.]+)\s*\|", line)
    if section and m:
        ms[(section, m[1])] = float(m[2])


def step(section, pick):
    hits = [v for (s, row), v in ms.items() if s == section and pick(row)]
    if len(hits) != 1:
        sys.exit(f"throughput_ratios.py: {section}: expected one matching row, found {len(hits)}")
    return hits[0]


print("group,bar,value")
for section in groups.values():
    peer = step(section, lambda r: r.startswith("HF") and "fused" in r and "compile" not in r)
    bars = [
        ("ours plain", lambda r: r == "plain"),
        ("ours plain: LM loss unfused", lambda r: r.startswith("plain") and "unfused" in r),
        ("ours plain: q/k/v as three GEMMs", lambda r: r.startswith("plain") and "three" in r),
        ("ours ASTRA (N=4 G=32)", lambda r: r.startswith("ASTRA") and "—" not in r),
        ("ours ASTRA: ATen path", lambda r: r.startswith("ASTRA") and "ATen" in r),
        ("ours ASTRA: search on CUDA cores", lambda r: r.startswith("ASTRA") and "CUDA cores" in r),
        ("ours ASTRA: codewords streamed", lambda r: r.startswith("ASTRA") and "streamed" in r),
        ("ours ASTRA: LM loss unfused", lambda r: r.startswith("ASTRA") and "unfused" in r),
    ]
    for bar, pick in bars:
        if ":" in bar and not any(s == section and pick(r) for s, r in ms):
            continue  # rows only some tables have (per model, or since a given commit)
        print(f"{section},{bar},{peer / step(section, pick):.2f}")
