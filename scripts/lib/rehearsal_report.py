"""The rehearsal report: what each step of the paper's recipe cost on generated data at the real
shapes, and what the real recipe will cost, projected from the measured rates.

  python3 rehearsal_report.py OUT MODE      (markdown on stdout; reproduce-paper.sh --rehearse)

Reads OUT/steps.jsonl (wall-clock, peak RSS, peak GPU memory of every command), the training runs'
summary.csv (training seconds and samples of their one epoch), the evaluation tables' "Scoring:"
line, the runtime's JSON, checkpoint and codebook sizes, OUT/rehearsal.json (settings and the real
epochs) and OUT/data/sizes.json (the real data sizes).

Projection of a step to the real recipe:
  training     startup + epochs × (warm-up extra + real training samples ÷ steady samples/s
               + real validation samples ÷ measured validation samples/s); the steady rate leaves
               out the epoch's first steps (summary.csv's warmup_seconds/warmup_samples), whose
               cost beyond that rate is the warm-up extra
  evaluation   startup + real test samples × rows ÷ measured scored samples/s
  calibration  startup + (first pass + residual pass) × recipe sample ÷ drawn sample + k-means ×
               reservoir rows at the recipe's sample ÷ reservoir rows drawn (K × 256 at most);
               as measured when the rehearsal drew the recipe's sample
  export, runtime, simulator: as measured (they do not depend on data size)
  a step the rehearsal did not run: the projection of the measured step it repeats (`twin`), with
               the step's own data sizes
"startup" is the wall-clock the step spent outside its measured loop (process start, loading the
model and data, writing results), kept as measured. GPU-hours: the projected wall-clock of the
steps that use the GPU (training, calibration, evaluation), one GPU each.
"""
import csv
import glob
import json
import math
import os
import re
import subprocess
import sys

BYTES_PER_TOKEN = 4.25  # GPT-2 BPE on WikiText (measured on WikiText-2's test split: 1,256,449 B → 295,876 tokens)


def load_steps(out):
    steps = {}
    path = os.path.join(out, "steps.jsonl")
    if os.path.exists(path):
        for line in open(path):
            r = json.loads(line)
            steps[r["label"]] = r  # the last attempt of a label counts
    return steps


MANIFEST = {}  # relative path -> bytes, from OUT/files.txt when the files themselves are gone


def size_mb(path):
    if os.path.isfile(path):
        return os.path.getsize(path) / 2**20
    if os.path.isdir(path):
        total = 0
        for root, _, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total / 2**20
    # A report made from a rehearsal's small files (its checkpoints left on the GPU machine):
    # `find OUT -type f -printf '%P %s\n' > OUT/files.txt` there keeps their sizes.
    rel = os.path.relpath(path, OUT_DIR[0])
    return sum(b for p, b in MANIFEST.items() if p == rel or p.startswith(rel + "/")) / 2**20


OUT_DIR = [""]


def load_manifest(out):
    OUT_DIR[0] = out
    path = os.path.join(out, "files.txt")
    if os.path.exists(path):
        for line in open(path):
            p, _, b = line.rstrip("\n").rpartition(" ")
            if b.isdigit():
                MANIFEST[p] = int(b)


def epoch_row(run):
    path = os.path.join(run, "summary.csv")
    if not os.path.exists(path):
        return None
    rows = list(csv.DictReader(open(path)))
    return rows[-1] if rows else None


def tokenized(out, name):
    """(documents, seconds, tokens) from a run log's "Tokenized N documents into T tokens in S s"
    line, when this run tokenized a parquet: sample (the first one to read it)."""
    log = os.path.join(out, "logs", name + ".log")
    m = re.search(r"Tokenized (\d+) documents into (\d+) tokens in ([\d.]+) s", open(log).read()) if os.path.exists(log) else None
    return (int(m[1]), float(m[3]), int(m[2])) if m else (None, None, None)


def codebook_header(path):
    """(metadata, {tensor: shape}) of a safetensors codebook file, or of the copy of its header
    beside it (PATH.header.json, for a report made from a rehearsal's small files); empty when
    neither is there."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
    elif os.path.isfile(path + ".header.json"):
        header = json.load(open(path + ".header.json"))
    else:
        return {}, {}
    meta = header.pop("__metadata__", {}) or {}
    return meta, {k: v["shape"] for k, v in header.items()}


def recipe_steps(recipe, cfg):
    """The labels of every step the real recipe runs (reproduce-paper.sh's order and names)."""
    groups = recipe.get("groups", cfg["groups"]).split()
    table2 = recipe.get("table2_devices", cfg["table2_devices"]).split() if "32" in groups else []
    models = recipe.get("gpt2_models", cfg.get("gpt2_models", "")).split()
    labels = ["train vit-c100", "evaluate c100-original"]
    for g in groups:
        labels += [f"calibrate c100-g{g}", f"train vit-c100-astra-g{g}", f"evaluate c100-astra-g{g}"]
    for d in table2:
        labels += [f"train vit-c100-astra-g32-n{d}", f"evaluate c100-astra-g32-n{d}"]
    labels.append("evaluate imagenet-original")
    for g in groups:
        labels += [f"calibrate imagenet-g{g}", f"train vit-imagenet-astra-g{g}", f"evaluate imagenet-astra-g{g}"]
    for m in models:
        labels += [f"evaluate wt103-{m}-pretrained", f"train {m}-wt103", f"evaluate wt103-{m}-original"]
        for g in groups:
            labels += [f"calibrate wt103-{m}-g{g}", f"train {m}-wt103-astra-g{g}", f"evaluate wt103-{m}-astra-g{g}"]
    for m in models:
        labels += [f"train {m}-wiki", f"evaluate wiki-{m}-original", f"evaluate zero-shot-{m}-original"]
        for g in groups:
            labels += [f"calibrate wiki-{m}-g{g}", f"train {m}-wiki-astra-g{g}",
                       f"evaluate wiki-{m}-astra-g{g}", f"evaluate zero-shot-{m}-astra-g{g}"]
    return labels


# What a recipe step repeats when the rehearsal did not run it: the same step at G = 32 (G = 16 has
# the same shapes with half the codebooks) or G = 1, at Table 2's measured N, and a Wikipedia step
# of a model on WikiText-103 (the same model; Wikipedia's data path is measured with another model).
TWIN_RULES = [
    (r"-g16\b", ["-g32", "-g1"]),
    (r"-n\d+\b", ["-n8", "-n6", "-n2", ""]),
    (r"^(train \S+)-wiki\b", [r"\1-wt103"]),
    (r"^(calibrate |evaluate )(wiki|zero-shot)-", [r"\1wt103-"]),
]


def twin(label, steps):
    """The measured step whose rates project LABEL, or None."""
    todo, seen = [label], {label}
    while todo:
        cur = todo.pop(0)
        if cur != label and cur in steps and steps[cur]["rc"] == 0:
            return cur
        for pattern, subs in TWIN_RULES:
            if re.search(pattern, cur):
                for sub in subs:
                    nxt = re.sub(pattern, sub, cur)
                    if nxt not in seen:
                        seen.add(nxt)
                        todo.append(nxt)
    return None


def fmt_h(seconds):
    if seconds is None:
        return "—"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def main():
    out, mode = sys.argv[1], sys.argv[2]
    load_manifest(out)
    cfg = json.load(open(os.path.join(out, "rehearsal.json")))
    sizes = json.load(open(os.path.join(out, "data", "sizes.json")))
    real, gen = sizes["real"], sizes.get("generated", {})
    epochs = cfg["real_epochs"]
    steps = load_steps(out)
    ctx = cfg["context"]
    wt = real["wikitext103"]
    train_tokens = wt["train_mb"] * 1e6 / BYTES_PER_TOKEN
    valid_tokens, test_tokens = wt["valid_tokens"], wt["test_tokens"]
    wp = real.get("wikipedia", {})
    wiki_tokens = lambda docs: docs * wp.get("bytes_per_article", 0) / BYTES_PER_TOKEN
    c100_train = real["cifar100"]["train"] * 0.9  # the default 10% validation hold-out
    imnet_train = real["imagenet"]["train"] - 10_000  # hold-out capped at 10,000
    # (real training samples per epoch, real validation samples, epochs, group) per training run
    def train_target(name):
        if name == "vit-c100":
            return c100_train, 5_000, epochs["cifar_base"], "CIFAR-100 ViT-B/16"
        if name.startswith("vit-c100-astra"):
            return c100_train, 5_000, epochs["cifar_astra"], "CIFAR-100 ViT-B/16"
        if name.startswith("vit-imagenet-astra"):
            return imnet_train, 10_000, epochs["imagenet_astra"], "ImageNet-1K ViT-B/16"
        if "-wiki" in name:
            model = name.split("-wiki")[0]
            return (wiki_tokens(wp["train_docs"]), wiki_tokens(wp["held_out_docs"]), epochs["text"],
                    f"Wikipedia {model}")
        model = name.split("-wt103")[0]
        return train_tokens, valid_tokens, epochs["text"], f"WikiText-103 {model}"

    def eval_target(name):
        if name.startswith("c100"):
            return real["cifar100"]["test"], "CIFAR-100 ViT-B/16"
        if name.startswith("imagenet"):
            return real["imagenet"]["val"], "ImageNet-1K ViT-B/16"
        if name.startswith("wiki-"):
            return wiki_tokens(wp["held_out_docs"]), "Wikipedia " + re.sub(r"^wiki-(.*?)-(original|astra-g\d+)$", r"\1", name)
        if name.startswith("zero-shot-"):  # trained on Wikipedia, scored on WikiText-103 valid
            return valid_tokens, "Wikipedia " + re.sub(r"^zero-shot-(.*?)-(original|astra-g\d+)$", r"\1", name)
        model = re.sub(r"^wt103-(.*?)-(pretrained|original|astra-g\d+)$", r"\1", name)
        return test_tokens, f"WikiText-103 {model}"

    def group_of_calib(name):
        if name.startswith("c100"):
            return "CIFAR-100 ViT-B/16"
        if name.startswith("imagenet"):
            return "ImageNet-1K ViT-B/16"
        if name.startswith("wiki-"):
            return "Wikipedia " + re.sub(r"^wiki-(.*)-g\d+$", r"\1", name)
        return "WikiText-103 " + re.sub(r"^wt103-(.*)-g\d+$", r"\1", name)

    recipe = cfg.get("recipe", {})
    k = cfg.get("k", 1024)
    tokens_per_example = lambda name: ctx if not name.startswith(("c100", "imagenet")) else (cfg["image_size"] // 16) ** 2 + 1

    def calibration(name, wall):
        """(projected seconds, size text) of calibration NAME at the recipe's sample, phase by phase."""
        f = os.path.join(out, "codebooks", name + ".safetensors")
        meta, shapes = codebook_header(f)
        size = f"codebooks {size_mb(f):,.1f} MiB" if size_mb(f) > 0 else ""
        phases = [float(x) for x in re.findall(r"([\d.]+) s", meta.get("seconds", ""))]
        used, real = int(meta.get("samples", 0) or 0), recipe.get("calib_samples", 0)  # per calibration
        if len(phases) != 3 or not used or not real or used == real:
            return wall, size
        first, kmeans, residual = phases
        cap, tok = k * 256, tokens_per_example(name)
        rows_used, rows_real = min(cap, used * tok), min(cap, real * tok)
        proj = max(wall - sum(phases), 0.0) + (first + residual) * real / used + kmeans * rows_real / rows_used
        blocks = [v for key, v in shapes.items() if key.endswith(".codebook")]
        if blocks:  # [G, K, D/G] per quantizer; the reservoir holds rows of width D
            width = blocks[0][0] * blocks[0][2]
            extra = len(blocks) * (rows_real - rows_used) * width * 4 / 2**20
            size += (f"; projected to {real:,} examples: first pass and residual ×{real / used:.3g}, "
                     f"k-means ×{rows_real / rows_used:.3g}, reservoir +{extra:,.0f} MiB")
        return proj, size

    def project(label, s, src):
        """The row of recipe step LABEL, measured by step SRC (itself, or the step it repeats)."""
        kind, _, name = label.partition(" ")
        sname = src.partition(" ")[2]
        wall, rss, gpu = s["wall_s"], s["peak_rss_mb"], s["peak_gpu_mb"]
        astra = "astra" in name
        proj, rate, size, group, uses_gpu = wall, "", "", "", True
        if kind == "train":
            run = os.path.join(out, "runs", sname)
            e = epoch_row(run)
            n_train, n_valid, ep, group = train_target(name)
            if e and float(e.get("train_seconds") or 0) > 0:
                t_s, t_n = float(e["train_seconds"]), float(e["train_samples"])
                v_s = max(float(e["seconds"]) - t_s, 0.0)
                # The steady state after the epoch's warm-up steps (autotuning, allocator), which
                # then count once per epoch as what they cost beyond that rate.
                w_s, w_n = float(e.get("warmup_seconds") or 0), float(e.get("warmup_samples") or 0)
                steady = w_s > 0 and t_s > w_s and t_n > w_n
                r = (t_n - w_n) / (t_s - w_s) if steady else t_n / t_s
                warm_extra = max(w_s - w_n / r, 0.0) if steady else 0.0
                text = "wt103" in sname or "-wiki" in sname
                unit = "tokens/s" if text else "images/s"
                rate = f"{r:,.0f} {unit} ({int(e['step'])} steps{', steady state' if steady else ''})"
                # validation: its measured seconds over what it scored (the hold-out of
                # REHEARSAL_VALID images, or the VALID file's tokens)
                v_n = valid_tokens if "wt103" in sname else cfg.get("valid_images")
                if "-wiki" in sname:  # the generated held-out articles the run scored
                    docs, _, tokens = tokenized(out, sname.split("-wiki")[0] + "-wiki")
                    articles = math.prod(gen.get("wikipedia_shards_articles", [0]))
                    v_n = min(max(round(articles * 0.005), 1), 5000) * tokens / docs if docs else None
                v_rate = (v_n / v_s) if v_s > 0 and v_n else None
                startup = max(wall - float(e["seconds"]), 0.0)
                proj = startup + ep * (warm_extra + n_train / r + (n_valid / v_rate if v_rate else 0.0))
                docs, secs, _ = tokenized(out, sname)
                if docs and secs and "-wiki" in name:  # tokenizing the real sample (once; cached for later steps)
                    proj += max(wp["train_docs"] + 2 * wp["held_out_docs"] - docs, 0) * secs / docs
                    rate += f"; tokenized {docs:,} articles in {secs:.1f} s"
            ck = sorted(glob.glob(os.path.join(run, "checkpoints", "*.safetensors"))) or sorted(
                os.path.join(out, p) for p in MANIFEST
                if p.startswith(f"runs/{sname}/checkpoints/") and p.endswith(".safetensors"))
            size = f"checkpoint {size_mb(ck[-1]):,.0f} MiB, model {size_mb(os.path.join(run, 'model')):,.0f} MiB" if ck else ""
        elif kind == "evaluate":
            n_real, group = eval_target(name)
            t = os.path.join(out, "tables", sname + ".md")
            m = re.search(r"Scoring: (\d+) (images|tokens) over (\d+) rows in ([\d.]+) s", open(t).read()) if os.path.exists(t) else None
            if m:
                scored, unit, nrows, secs = int(m[1]), m[2], int(m[3]), float(m[4])
                if secs > 0:
                    r = scored / secs
                    rate = f"{r:,.0f} {unit}/s over {nrows} rows"
                    proj = max(wall - secs, 0.0) + n_real * nrows / r
        elif kind == "calibrate":
            group = group_of_calib(name)
            proj, size = calibration(sname, wall)
            astra = True
        elif kind in ("export", "runtime"):
            uses_gpu = False
            group = "deployment (runtime on CPU workers)"
            astra = True
            if kind == "export":
                size = f"export {size_mb(os.path.join(out, 'deploy', sname, 'model')):,.0f} MiB"
            else:
                j = os.path.join(out, "deploy", sname, "runtime.json")
                if os.path.exists(j):
                    d = json.load(open(j))
                    med = d.get("median_ms") or d.get("latency_ms", {}).get("median")
                    rate = f"median {med:,.0f} ms per inference" if isinstance(med, (int, float)) else ""
        else:
            uses_gpu = False
            group = "data and simulator"
        derived = None if src == label else src
        return (group, astra, label, wall, rate, rss, gpu, size, proj, uses_gpu, s["rc"], derived)

    plan = recipe_steps(recipe, cfg)
    rows = [project(label, s, label) for label, s in steps.items()]
    for label in plan:
        src = None if label in steps else twin(label, steps)
        if src:
            rows.append(project(label, steps[src], src))
    # The recipe's order; the data first, and deployment and the simulator (not in `plan`) last.
    order = {label: i + 1 for i, label in enumerate(plan)}
    rows.sort(key=lambda r: 0 if r[2] == "generate data" else order.get(r[2], len(plan) + 1))

    dev = cfg["device"]
    gpu_name = cfg.get("gpu") or _gpu_name()
    print(f"# Rehearsal of the paper's recipe ({mode}): generated data, random models of the {'real' if mode == 'full' else 'tiny'} shapes\n")
    print(f"Command: `scripts/reproduce-paper.sh --rehearse {mode} --out {out}`; commit {cfg.get('commit') or _commit()}; "
          f"device {dev}{' (' + gpu_name + ')' if gpu_name else ''}; every training run stopped after "
          f"{cfg['steps_per_run']} steps (batch {cfg['batch']} images / {cfg['text_batch']} × {ctx} tokens), "
          f"G ∈ {{{', '.join(cfg['groups'].split())}}}, N = {cfg['devices']} (Table 2 rows: N = {cfg['table2_devices'] or 'none'}). "
          f"Real recipe projected to: epochs {epochs}, CIFAR-100 {real['cifar100']['train']:,} / {real['cifar100']['test']:,} images, "
          f"ImageNet-1K {real['imagenet']['train']:,} / {real['imagenet']['val']:,}, WikiText-103 ≈ {train_tokens / 1e6:.0f} M "
          f"training tokens ({wt['train_mb']} MB at {BYTES_PER_TOKEN} bytes per GPT-2 token) and ≈ {test_tokens:,} test tokens"
          + (f", Wikipedia {wp['train_docs']:,} sampled articles ≈ {wiki_tokens(wp['train_docs']) / 1e6:,.0f} M tokens "
             f"(an estimate: {wp['bytes_per_article']:,} bytes of text per article) and {wp['held_out_docs']:,} held-out articles per split"
             if wp else "") + ".\n")
    if mode != "full":
        print("**Tiny shapes**: the times below say the pipeline runs end to end; the projection only means something for `--rehearse full`.\n")
    failed = [r for r in rows if r[10] != 0 and not r[11]]
    if failed:
        print("**Failed steps**: " + ", ".join(f"{r[2]} (exit {r[10]})" for r in failed) + "\n")
    missing = [label for label in plan if label not in steps and not twin(label, steps)]
    if missing:
        print(f"**Not measured and not derived** ({len(missing)} steps of the recipe, left out of the totals): "
              + ", ".join(missing) + "\n")
    print("## Every step\n")
    print("Rows in *italics* were not run: their projection applies the measured rates of the step named "
          "(the same model and shapes) to the step's own data sizes.\n")
    print("| step | wall (measured) | throughput | peak host RSS | peak GPU memory | sizes | projected, real recipe |")
    print("|---|---:|---|---:|---:|---|---:|")
    for g, a, label, wall, rate, rss, gpu, size, proj, ug, rc, src in rows:
        if src:
            print(f"| *{label}*: derived from {src} | | | | | | {fmt_h(proj)} |")
            continue
        gm = "—" if gpu is None else f"{gpu:,.0f} MiB"
        print(f"| {label}{'' if rc == 0 else ' (failed)'} | {fmt_h(wall)} | {rate} | {rss:,.0f} MiB | {gm} | {size} | {fmt_h(proj)} |")
    print("\n## Projected cost of the real recipe\n")
    print("GPU-hours: training, calibration and evaluation on one GPU each; deployment and simulator on CPUs.\n")
    print("| experiment | without ASTRA (original: fine-tune + evaluation) | with ASTRA (calibration + ASTRA fine-tuning + evaluation, all G and N) | GPU-hours, total |")
    print("|---|---:|---:|---:|")
    groups = []
    for r in rows:
        if r[0] not in groups and any(x[0] == r[0] and x[9] for x in rows):
            groups.append(r[0])
    total_gpu = 0.0
    for g in groups:
        plain = sum(r[8] for r in rows if r[0] == g and not r[1])
        astra = sum(r[8] for r in rows if r[0] == g and r[1])
        gh = sum(r[8] for r in rows if r[0] == g and r[9]) / 3600
        total_gpu += gh
        print(f"| {g} | {fmt_h(plain)} | {fmt_h(astra)} | {gh:,.1f} |")
    total = sum(r[8] for r in rows)
    print(f"| **all** | | | **{total_gpu:,.1f}** |")
    other = [r for r in rows if r[0] not in groups]
    if other:
        print("\nOff the GPU: " + ", ".join(f"{r[2]} {fmt_h(r[8])}" for r in other)
              + f". Everything in sequence: {fmt_h(total)} of wall-clock.")
    print("\nMeasured with scripts/lib/step_meter.py: peak host RSS is the command's high-water mark "
          "(getrusage); peak GPU memory is nvidia-smi's used memory sampled every 0.5 s above what was "
          "in use before the command, so it includes the CUDA context and the caching allocator's reserve.")


def _gpu_name():
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        return r.stdout.splitlines()[0].strip() if r.returncode == 0 and r.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
