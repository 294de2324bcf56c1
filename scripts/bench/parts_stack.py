"""The parts table of `astra-train bench-step --parts` (markdown) → a `group,bar,value` CSV for
`astra-sim plot-bars --stacked`: one ViT-B block's forward + backward, plain, and as ASTRA's
training step runs it (with the CUDA kernels and with the ATen path), split into what it is made of.

  python3 parts_stack.py PARTS.md > parts.csv

Per ASTRA block: the plain block, MPA's extra (the masked attention over S + T keys and the
second key/value projection: the MPA block with quantized keys given minus the plain block), the
nearest-codeword search, and the rest of the training quantize forward and backward (NAQ draw,
decode, EMA update, commitment, straight-through). The parts are timed one by one, so their sum
differs from the whole block timed at once by a few percent; the whole is in the table beside.
"""
import re
import sys

rows = {}
for line in open(sys.argv[1]):
    m = re.match(r"\|\s*(.+?)\s*\|\s*([\d.]+)\s*\|\s*$", line)
    if m:
        rows[m[1]] = float(m[2])


def part(prefix):
    hits = [v for k, v in rows.items() if k.startswith(prefix)]
    if len(hits) != 1:
        sys.exit(f"parts_stack.py: expected one row starting '{prefix}' in {sys.argv[1]}, found {len(hits)}")
    return hits[0]


plain = part("block fwd+bwd, plain")
mpa = part("block fwd+bwd, MPA (mask") - plain
print("group,bar,value")
print(f"plain ViT-B block,plain block,{plain:.3f}")
for path in ("kernels", "ATen"):
    encode = part(f"VQ encode (fp32 nearest codeword; {path})")
    quantize = part(f"VQ quantize fwd+bwd (STE into X), training; {path}")
    group = f"ASTRA block ({'CUDA kernels' if path == 'kernels' else 'ATen path'})"
    print(f"{group},plain block,{plain:.3f}")
    print(f"{group},MPA extra (mask; K/V),{mpa:.3f}")
    print(f"{group},VQ search,{encode:.3f}")
    print(f"{group},VQ rest (NAQ; EMA; STE),{quantize - encode:.3f}")
