#!/usr/bin/env python3
"""One training step's kernels from a kernel-times.sh trace, summed by name.

The trace's lines are "kind,start_ns,end_ns,stream,name" (K kernel, C copy, S memset). Steps end
at the optimizer's kernel (`adamw_step`); a step that runs `nearest_codeword*` is an ASTRA step.
Prints, for the last plain and the last ASTRA step: span, GPU-busy time, kernel count, and the TOP
kernels by total time (default 30).

    python3 scripts/bench/kernel_times.py TRACE.csv [TOP]
"""
import collections
import sys


def read(path):
    rows = []
    with open(path) as f:
        for line in f:
            kind, start, end, stream, name = line.rstrip("\n").split(",", 4)
            rows.append((int(start), int(end), kind, int(stream), name))
    rows.sort()
    return rows


def steps(rows):
    out, cur = [], []
    for r in rows:
        cur.append(r)
        if "adamw_step" in r[4]:
            out.append(cur)
            cur = []
    return out


def busy_ns(step):
    total, s0, e0 = 0, None, None
    for s, e, *_ in step:
        if e0 is None or s > e0:
            if e0 is not None:
                total += e0 - s0
            s0, e0 = s, e
        else:
            e0 = max(e0, e)
    return total + (e0 - s0 if e0 is not None else 0)


def report(label, step, top):
    span = (step[-1][1] - step[0][0]) / 1e6
    busy = busy_ns(step) / 1e6
    print(f"== {label}: span {span:.2f} ms, GPU busy {busy:.2f} ms, idle {span - busy:.2f} ms, "
          f"{len(step)} kernels and copies")
    by_name = collections.defaultdict(lambda: [0, 0])
    for s, e, _, _, name in step:
        by_name[name][0] += e - s
        by_name[name][1] += 1
    for name, (ns, count) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{ns / 1e6:8.3f} ms {count:5d}x  {name[:150]}")


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    all_steps = steps(read(sys.argv[1]))
    if not all_steps:
        sys.exit(f"{sys.argv[1]}: no optimizer step (adamw_step) in the trace")
    astra = [s for s in all_steps if any("nearest_codeword" in r[4] for r in s)]
    plain = [s for s in all_steps if s not in astra]
    for label, group in (("plain", plain), ("ASTRA", astra)):
        if group:
            report(f"{label} (the last of {len(group)} steps)", group[-1], top)


if __name__ == "__main__":
    main()
