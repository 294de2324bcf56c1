"""Tabulates scripts/bench/multi-gpu.sh: each --gpus run against its single-process reference
(NAME-gpusN against NAME, NAME-resumed-gpusN against NAME: the largest weight difference,
relative to each tensor's largest value, of the last checkpoint;
validation loss per epoch; training throughput)."""
import csv
import sys
from pathlib import Path

from safetensors.torch import load_file


def last_checkpoint(run: Path) -> Path:
    return sorted((run / "checkpoints").glob("epoch-*.safetensors"))[-1]


def max_rel_diff(a: Path, b: Path) -> float:
    ta, tb = load_file(str(a)), load_file(str(b))
    worst = 0.0
    for name, t in ta.items():
        if name.endswith("key.bias"):  # softmax ignores it: its gradient is rounding noise
            continue
        d = (t.double() - tb[name].double()).abs().max().item()
        worst = max(worst, d / max(t.double().abs().max().item(), 1e-6))
    return worst


def summary(run: Path) -> list[dict]:
    with open(run / "summary.csv") as f:
        return list(csv.DictReader(f))


def main() -> None:
    out = Path(sys.argv[1])
    print("| run | reference | max weight difference | valid loss per epoch | reference's | train img/s |")
    print("|---|---|---:|---|---|---:|")
    for run in sorted(out.glob("*-gpus*")):
        if not (run / "complete.json").exists():
            continue
        # plain-gpus4 → plain; plain-resumed-gpus1 (stopped, then resumed) → plain
        ref = out / run.name.split("-gpus")[0].removesuffix("-resumed")
        rows, ref_rows = summary(run), summary(ref)
        d = max_rel_diff(last_checkpoint(ref), last_checkpoint(run))
        loss = ", ".join(f"{float(r['valid_loss']):.6f}" for r in rows)
        ref_loss = ", ".join(f"{float(r['valid_loss']):.6f}" for r in ref_rows)
        rate = sum(float(r["train_samples"]) for r in rows) / sum(float(r["train_seconds"]) for r in rows)
        print(f"| {run.name} | {ref.name} | {d:.2e} | {loss} | {ref_loss} | {rate:.0f} |")


if __name__ == "__main__":
    main()
