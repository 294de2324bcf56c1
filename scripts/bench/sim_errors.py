#!/usr/bin/env python3
"""astra-sim's error on every run a distributed-real.sh folder holds, re-predicted now.

    python3 scripts/bench/sim_errors.py [--sim BIN[,BIN...]] [--alpha-ms A]
        [--message-latency trace|alpha] [-v] DIR...

Each run's own trace (DIR/NAME.trace.json, or inside DIR/traces.tar.gz) is predicted as
distributed-real.sh predicts it (sim_predict.py: alpha-beta, direct sends overlapping compute, the
shaper's 3,028-byte bucket, bandwidth = rate × the payload share of what the shaper counts) by each
astra-sim binary given (default target/release/astra-sim), and set against the run's measured median
(DIR/NAME.json). A trace the runtime recorded message latencies in gives each receiver its own
(astra-sim's default); `--message-latency alpha` gives every message α instead (binaries before
the flag existed take α anyway). Prints per folder the number of runs, the largest |error| and how many are over 5%
for each binary; -v also every run. Use it to see what a change to the simulator does to every
stored measurement.
"""
import argparse
import json
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sim_predict import ALPHA_MS, RUN, predict  # noqa: E402  (the one place that says how)


def traces_of(folder, tmp):
    packed = folder / "traces.tar.gz"
    if packed.exists():
        with tarfile.open(packed) as t:
            t.extractall(tmp, filter="data")
    found = list(folder.glob("*.trace.json")) + list(Path(tmp).glob("*.trace.json"))
    return {p.name[: -len(".trace.json")]: p for p in found}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sim", default="target/release/astra-sim")
    ap.add_argument("--alpha-ms", type=float, default=ALPHA_MS)
    ap.add_argument("--message-latency", choices=["trace", "alpha"], default="trace")
    ap.add_argument("-v", action="store_true")
    ap.add_argument("dirs", nargs="+", type=Path)
    a = ap.parse_args()
    sims = a.sim.split(",")
    for s in sims:
        if not Path(s).is_file():
            sys.exit(f"sim_errors.py: no astra-sim binary at {s}")
    print("| folder | runs | " + " | ".join(f"largest error, {s} | over 5%" for s in sims) + " |")
    print("|---|---:|" + "---:|---:|" * len(sims))
    for d in a.dirs:
        if not d.is_dir():
            sys.exit(f"sim_errors.py: {d} is not a folder")
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for name, trace in sorted(traces_of(d, tmp).items()):
                summary_file = d / f"{name}.json"
                if not RUN.match(name) or not summary_file.exists():
                    continue
                summary = json.loads(summary_file.read_text())
                measured = summary["median_ms"]
                errors = [100 * (predict(s, trace, name, summary, a.alpha_ms, a.message_latency) - measured) / measured
                          for s in sims]
                rows.append((name, measured, errors))
        cols = []
        for i in range(len(sims)):
            e = [abs(r[2][i]) for r in rows]
            cols.append(f"{max(e):.1f}% | {sum(x > 5 for x in e)}" if e else "– | –")
        print(f"| {d} | {len(rows)} | " + " | ".join(cols) + " |")
        if a.v:
            for name, measured, errors in rows:
                print(f"|   {name} | {measured:.1f} ms | " + " | ".join(f"{e:+.1f}% | " for e in errors))


if __name__ == "__main__":
    main()
