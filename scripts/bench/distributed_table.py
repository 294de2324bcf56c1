"""Markdown table of scripts/bench/distributed-real.sh's runs: measured latency of every
configuration (median of its timed runs), the speedup over the single device, and astra-sim's
prediction for the same run from its own measured trace.

usage: distributed_table.py OUT_DIR PREFIX DEVICES THREADS "TOKENS" "MBPS" "GROUPS"
(runs are named PREFIX{T}-single, PREFIX{T}-r{R}-sp, PREFIX{T}-r{R}-g{G})
"""

import csv
import json
import sys
from pathlib import Path


def latency(path: Path) -> float:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if len(rows) != 1:
        raise SystemExit(f"{path}: expected one prediction, found {len(rows)}")
    return float(rows[0]["latency_ms"])


def main() -> None:
    out, prefix, n, threads = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    tokens, rates, groups = (s.split() for s in sys.argv[5:8])
    print(
        f"Devices N = {n}, {threads} libtorch thread(s) per worker (the single device gets the same), "
        "batch 1, median of the timed runs.\n"
    )
    print(
        "| T | Mbit/s | method | measured (ms) | speedup vs single | compute, slowest worker (ms) "
        "| waiting, slowest (ms) | astra-sim alpha-beta (ms) | error | paper model (ms) |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    errors = []
    for t in tokens:
        single = json.loads((out / f"{prefix}{t}-single.json").read_text())
        s_ms = single["median_ms"]
        print(f"| {t} | – | single | {s_ms:.1f} | 1.00 | {max(single['compute_ms']):.1f} | – | – | – | – |")
        for r in rates:
            for meth in ["sp"] + [f"g{g}" for g in groups]:
                name = f"{prefix}{t}-r{r}-{meth}"
                s = json.loads((out / f"{name}.json").read_text())
                ab = latency(out / f"{name}.ab.csv")
                paper = latency(out / f"{name}.paper.csv")
                m = s["median_ms"]
                err = (ab - m) / m * 100
                errors.append(abs(err))
                label = "SP (fp32)" if meth == "sp" else f"ASTRA G={meth[1:]}"
                print(
                    f"| {t} | {r} | {label} | {m:.1f} | {s_ms / m:.2f} | {max(s['compute_ms']):.1f} "
                    f"| {max(s['wait_ms']):.1f} | {ab:.1f} | {err:+.1f}% | {paper:.1f} |"
                )
    print(f"\nLargest |error| of astra-sim's alpha-beta prediction: {max(errors):.1f}%.")


if __name__ == "__main__":
    main()
