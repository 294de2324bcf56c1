#!/usr/bin/env python3
"""astra-sim's prediction of a distributed-real.sh run from its own measured trace, the one place
that says how: alpha-beta, direct sends overlapping the compute that does not need them, α = 0.05
ms where the trace has no measured latency, the shapers' 3,028-byte token bucket, bandwidth = link
rate × the payload share of what the shaper counts (TCP behind the kernel 1448/1547: segments and
the ACKs sharing the uplink, results/sim-vs-live.md; user space and multicast 1448/1514:
segments or datagrams); and the paper's model at the link rate.

    python3 scripts/bench/sim_predict.py SIM DIR NAME

writes DIR/NAME.ab.csv and DIR/NAME.paper.csv from DIR/NAME.trace.json and the run's summary
DIR/NAME.json. sim_errors.py re-predicts stored runs with the same function.
"""
import re
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = re.compile(r"(?:(?:gpt2|llama)-)?t(\d+)(?:-n\d+)?-r(\d+)-(sp|g(\d+))(-mc)?$")
ALPHA_MS = 0.05
BURST_BYTES = 3028


def run_of(name, summary):
    """(method, tokens, rate in Mbit/s, devices, payload share) of run NAME."""
    m = RUN.match(name)
    if not m:
        raise ValueError(f"{name} is not a distributed-real.sh run name (PREFIX-tT-nN-rR-sp|gG[-mc])")
    tokens, rate, n = int(m.group(1)), float(m.group(2)), summary["devices"]
    method = "sp" if m.group(3) == "sp" else f"astra-g{m.group(4)}"
    kernel_tcp = "user space" not in summary["network"] and not m.group(5)
    return method, tokens, rate, n, (1448 / 1547 if kernel_tcp else 1448 / 1514)


def sweep(sim, trace, name, summary, network, out):
    method, tokens, rate, n, share = run_of(name, summary)
    args = [sim, "sweep", "--trace", str(trace), "--methods", method, "--devices", str(n),
            "--tokens", str(tokens), "--out", str(out)] + network(rate, share)
    subprocess.run(args, check=True, capture_output=True)
    header, row = (line.split(",") for line in Path(out).read_text().splitlines()[:2])
    return float(row[header.index("latency_ms")])


def predict(sim, trace, name, summary, alpha=ALPHA_MS, latency="trace", out=None):
    """The alpha-beta prediction's latency (ms); its CSV goes to `out` if given. `latency`
    "alpha" gives every message α instead of the latencies the trace measured (binaries before
    `--message-latency` existed take α anyway)."""
    def network(rate, share):
        return (["--network", "alpha-beta", "--alpha-ms", str(alpha), "--algorithm", "direct",
                 "--overlap", "true", "--mbps", str(rate * share),
                 "--burst-bits", str(BURST_BYTES * 8 * share)]
                + (["--message-latency", latency] if latency != "trace" else []))
    if out is not None:
        return sweep(sim, trace, name, summary, network, out)
    with tempfile.TemporaryDirectory() as tmp:
        return sweep(sim, trace, name, summary, network, Path(tmp) / "ab.csv")


def paper(sim, trace, name, summary, out):
    """The paper model's prediction at the link rate (ms), its CSV to `out`."""
    return sweep(sim, trace, name, summary, lambda rate, _: ["--network", "paper", "--mbps", str(rate)], out)


def main():
    if len(sys.argv) != 4:
        sys.exit("usage: sim_predict.py SIM DIR NAME")
    sim, d, name = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    import json
    summary_file, trace = d / f"{name}.json", d / f"{name}.trace.json"
    for f in (summary_file, trace):
        if not f.is_file():
            sys.exit(f"sim_predict.py: no {f} (did the run finish?)")
    summary = json.loads(summary_file.read_text())
    predict(sim, trace, name, summary, out=d / f"{name}.ab.csv")
    paper(sim, trace, name, summary, d / f"{name}.paper.csv")


if __name__ == "__main__":
    main()
