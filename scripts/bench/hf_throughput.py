"""The PyTorch peer for `astra-train bench-step`: training-step throughput of Hugging Face
transformers' ViTForImageClassification (ViT-B/16, 224², 1000 classes) and GPT2LMHeadModel
(GPT-2 small), random weights and data, attn_implementation="sdpa", bf16 autocast, AdamW
(torch.optim, lr 1e-4), synchronised timing of forward + backward + optimizer step, median
after warm-up. Prints one markdown row per model, same columns as bench-step.

  python3 hf_throughput.py --model vit --batch 128 [--steps 20 --warmup 5]
  python3 hf_throughput.py --model gpt2 --batch 8 --seq 1024
  ... --fused             torch.optim.AdamW(fused=True) instead of the default foreach update
  ... --compile           the model under torch.compile (default mode), with the fused AdamW
"""
import argparse, statistics, time

import torch
from transformers import GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

ap = argparse.ArgumentParser()
ap.add_argument("--model", choices=["vit", "gpt2"], required=True)
ap.add_argument("--batch", type=int, default=128)
ap.add_argument("--seq", type=int, default=1024)
ap.add_argument("--steps", type=int, default=20)
ap.add_argument("--warmup", type=int, default=5)
ap.add_argument("--fp32", action="store_true")
ap.add_argument("--fused", action="store_true")
ap.add_argument("--compile", action="store_true")
a = ap.parse_args()

dev = torch.device("cuda")
torch.manual_seed(0)
if a.model == "vit":
    cls, cfg, tokens = ViTForImageClassification, ViTConfig(num_labels=1000), (224 // 16) ** 2
else:
    cls, cfg, tokens = GPT2LMHeadModel, GPT2Config(n_positions=max(1024, a.seq)), a.seq
# `_from_config` takes attn_implementation in transformers 4.x and 5.x alike.
model = cls._from_config(cfg, attn_implementation="sdpa")
assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
model = model.to(dev).train()
fused = a.fused or a.compile
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused)
if a.compile:
    model = torch.compile(model)
times = []
for step in range(a.warmup + a.steps):
    if a.model == "vit":
        x = torch.randn(a.batch, 3, 224, 224, device=dev)
        y = torch.randint(0, 1000, (a.batch,), device=dev)
        kw = dict(pixel_values=x, labels=y)
    else:
        ids = torch.randint(0, 50257, (a.batch, a.seq), device=dev)
        kw = dict(input_ids=ids, labels=ids)
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=not a.fp32):
        loss = model(**kw).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    torch.cuda.synchronize()
    if step >= a.warmup:
        times.append(time.perf_counter() - t)
times.sort()
med = statistics.median(times)
name = "HF ViTForImageClassification" if a.model == "vit" else "HF GPT2LMHeadModel"
name += " (sdpa, torch.compile, fused AdamW)" if a.compile else " (sdpa, fused AdamW)" if fused else " (sdpa)"
print(f"| {name} | {med*1e3:.1f} | {times[0]*1e3:.1f} | {times[-1]*1e3:.1f} | {a.batch/med:.1f} | {a.batch*tokens/med:.0f} |")
