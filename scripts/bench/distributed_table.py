"""Markdown table of scripts/bench/distributed-real.sh's runs at one N: measured latency of every
configuration (median of its timed runs), the speedup over the single device of that N (and, where
SINGLE_BESIDE=1 measured it, over the single device running beside N − 1 copies of itself, as each
worker runs beside the others), what the busiest worker put on the wire, the index messages lost
(multicast), and astra-sim's prediction for the same run from its own measured trace.

usage: distributed_table.py OUT_DIR PREFIX DEVICES THREADS "TOKENS" "MBPS" "SP_MBPS" "GROUPS"
       "MULTICAST_GROUPS" SHAPER WORKER_DEVICE
(runs are named PREFIX{T}-n{N}-single, -r{R}-sp, -r{R}-g{G}, -r{R}-g{G}-mc)
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


def remote_keys(summary: dict) -> str:
    """How many remote keys a block step attended to (its sources' tokens, or their distinct
    codewords at G = 1), mean over the blocks, on the worker with the most (a causal model's first
    worker has none); – where the run did not report them."""
    workers = [w for w in summary.get("remote_keys", []) if w]
    return f"{max(sum(w) / len(w) for w in workers):.0f}" if workers else "–"


def main() -> None:
    out, prefix, n, threads = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    tokens, rates, sp_rates, groups, mc_groups = (s.split() for s in sys.argv[5:10])
    shaper, device = sys.argv[10], sys.argv[11]
    shaped = "the kernel (tc in network namespaces)" if shaper == "kernel" else "each worker in user space"
    where = (
        f"{threads} libtorch thread(s) per worker (the single device gets the same)"
        if device == "cpu"
        else f"every worker on the one GPU ({device}), the single device too"
    )
    if device != "cpu" and (out / "mps.txt").exists():
        where += ", under CUDA MPS (the workers' kernels share the GPU at once)"
    if device != "cpu" and (out / "host-wait.txt").exists():
        wait = (out / "host-wait.txt").read_text().strip()
        where += f", host threads waiting for the GPU by `{wait}` (ASTRA_CUDA_HOST_WAIT)"
    single_json = out / f"{prefix}{tokens[0]}-n{n}-single.json"
    if device == "cpu" and single_json.exists() and json.loads(single_json.read_text()).get("pinned_cores"):
        where += ", each pinned to cores of its own (`--pin-cores`)"
    beside_of = {t: out / f"{prefix}{t}-n{n}-single-beside.json" for t in tokens}
    beside = any(p.exists() for p in beside_of.values())
    print(f"### N = {n}\n")
    print(f"{where}; uplinks shaped by {shaped}; batch 1, median of the timed runs.\n")
    print(
        "| T | Mbit/s | method | transport | measured (ms) | speedup vs single | compute, slowest worker (ms) "
        "| waiting, slowest (ms) | sent, busiest worker (KB) | lost | remote keys a block, most (mean) | astra-sim alpha-beta (ms) | error "
        "| paper model (ms) |" + (f" speedup vs single beside {n - 1} {'copy' if n == 2 else 'copies'} |" if beside else "")
    )
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if beside else ""))
    errors = []
    for t in tokens:
        base = f"{prefix}{t}-n{n}"
        single = json.loads((out / f"{base}-single.json").read_text())
        s_ms = single["median_ms"]
        b_ms = None
        if beside_of[t].exists():
            b = json.loads(beside_of[t].read_text())
            b_ms = b["median_ms"]
        extra = lambda ms: (f" {b_ms / ms:.2f} |" if b_ms else " – |") if beside else ""
        print(
            f"| {t} | – | single | – | {s_ms:.1f} | 1.00 | {max(single['compute_ms']):.1f} "
            "| – | – | – | – | – | – | – |" + extra(s_ms)
        )
        if b_ms:
            print(
                f"| {t} | – | single, {n} copies at once | – | {b_ms:.1f} | {s_ms / b_ms:.2f} "
                f"| {max(b['compute_ms']):.1f} | – | – | – | – | – | – | – |" + extra(b_ms)
            )
        rows = sorted(
            {int(r) for r in rates} | {int(r) for r in sp_rates}
        )
        for r in rows:
            methods = [("sp", "sp", "TCP")] if str(r) in sp_rates else []
            if str(r) in rates:
                methods += [(f"g{g}", f"g{g}", "TCP") for g in groups]
                methods += [(f"g{g}-mc", f"g{g}", "multicast") for g in mc_groups]
            for suffix, meth, transport in methods:
                name = f"{base}-r{r}-{suffix}"
                if not (out / f"{name}.json").exists():
                    continue
                s = json.loads((out / f"{name}.json").read_text())
                ab = latency(out / f"{name}.ab.csv")
                paper = latency(out / f"{name}.paper.csv")
                m = s["median_ms"]
                err = (ab - m) / m * 100
                errors.append(abs(err))
                label = "SP (fp32)" if meth == "sp" else f"ASTRA G={meth[1:]}"
                lost = "–"
                if transport == "multicast":
                    lost = f"{100 * s.get('loss_rate', 0.0):.2f}%"
                    if s.get("late_messages", 0):
                        lost += f" ({s['late_messages']} late)"
                print(
                    f"| {t} | {r} | {label} | {transport} | {m:.1f} | {s_ms / m:.2f} "
                    f"| {max(s['compute_ms']):.1f} | {max(s['wait_ms']):.1f} "
                    f"| {max(s['sent_bytes']) / 1000:.1f} | {lost} | {remote_keys(s)} | {ab:.1f} | {err:+.1f}% | {paper:.1f} |"
                    + extra(m)
                )
    if errors:
        print(f"\nLargest |error| of astra-sim's alpha-beta prediction at N = {n}: {max(errors):.1f}%.")


if __name__ == "__main__":
    main()
