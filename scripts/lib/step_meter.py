"""Runs one command of the recipe and records what it cost, for the rehearsal report.

  python3 step_meter.py LOG.jsonl LABEL -- CMD ARGS...

Appends {"label", "wall_s", "peak_rss_mb", "peak_gpu_mb", "rc", "cmd"} to LOG.jsonl and exits with
the command's status. Peak host RSS is the kernel's high-water mark of the largest descendant the
command waited for (getrusage RUSAGE_CHILDREN); peak GPU memory is nvidia-smi's used memory sampled
every 0.5 s minus what was in use before the command started (so it includes the CUDA context and
the caching allocator's reserve, as a user watching nvidia-smi sees it); null without nvidia-smi.
The command's output passes through untouched.
"""
import json
import resource
import shutil
import subprocess
import sys
import threading
import time


def gpu_used_mb():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10)
        return sum(float(v) for v in out.stdout.split()) if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def main():
    if len(sys.argv) < 5 or sys.argv[3] != "--":
        sys.exit("usage: step_meter.py LOG.jsonl LABEL -- CMD ARGS...")
    log, label, cmd = sys.argv[1], sys.argv[2], sys.argv[4:]
    has_gpu = shutil.which("nvidia-smi") is not None
    base = gpu_used_mb() if has_gpu else None
    peak = [base]
    done = threading.Event()

    def poll():
        while not done.wait(0.5):
            v = gpu_used_mb()
            if v is not None and (peak[0] is None or v > peak[0]):
                peak[0] = v

    poller = threading.Thread(target=poll, daemon=True)
    if base is not None:
        poller.start()
    t0 = time.monotonic()
    rc = subprocess.call(cmd)
    wall = time.monotonic() - t0
    done.set()
    rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    rec = {
        "label": label,
        "wall_s": round(wall, 2),
        "peak_rss_mb": round(rss_kb / 1024, 1),
        "peak_gpu_mb": None if base is None or peak[0] is None else round(peak[0] - base, 1),
        "rc": rc,
        "cmd": " ".join(cmd),
    }
    with open(log, "a") as f:
        f.write(json.dumps(rec) + "\n")
    sys.exit(rc)


if __name__ == "__main__":
    main()
