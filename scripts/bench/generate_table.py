"""The tables of scripts/bench/generate-table.sh from its JSON summaries.

  python3 generate_table.py OUT_DIR
"""
import json, math, os, sys

d = sys.argv[1]
load = lambda n: json.load(open(os.path.join(d, n + ".json")))
print("## The decoding device's cache against App. G (Llama-3-8B key/value shape, per block)\n")
print("T = 1024 prompt tokens, N = 4 devices (the decoding device holds T/N = 256 of them), K = 1024 "
      "(10 bits per index), key/value width d = 1024, fp32 (b = 4 bytes); 2 blocks measured, per block shown. "
      "App. G: M_KV = 2·[(T/N)·L·d·b + (N−1)·(T/N)·L·G·log2K/8]; Llama-3-8B has L = 32 and fp16 (b = 2): "
      "33.9 MiB at G = 32 instead of 128 MiB.\n")
print("| cache | own tokens' K/V, measured (B) | remote indices, measured (B) | App. G own | App. G remote | total per block | Llama-3-8B (32 blocks, fp16) |")
print("|---|---:|---:|---:|---:|---:|---:|")
T, N, dkv, b, L = 1024, 4, 1024, 4, 2
single = load("cache-single")["cache_bytes"]
print(f"| one device (all tokens full precision) | {single['local'] // L:,} | 0 | {2 * T * dkv * b:,} | 0 | "
      f"{single['local'] // L:,} | {2 * T * dkv * 2 * 32 / 2**20:.1f} MiB |")
for g in (1, 16, 32):
    c = load(f"cache-g{g}")["cache_bytes"]
    own, rem = 2 * (T // N) * dkv * b, 2 * (N - 1) * (T // N) * g * 10 / 8
    paper = (2 * (T // N) * dkv * 2 * 32 + 2 * (N - 1) * (T // N) * 32 * g * 10 / 8) / 2**20
    print(f"| ASTRA G={g} | {c['local'] // L:,} | {c['remote'] // L:,} | {own:,} | {rem:,.0f} | "
          f"{(c['local'] + c['remote']) // L:,} | {paper:.1f} MiB |")
print("\n## Time to first token and decode rate, 12×768 Llama-shaped model (GQA 12/4), N = 2 vs one device\n")
print("Prompt T = 1024 (random ids), in process: the prefill runs the two devices' engines one after the "
      "other in this process (no network; the networked prefill is results/distributed-real.md's Llama "
      "table), then the last device decodes with its cache; greedy.\n")
print("| run | time to first token (ms) | decode tokens/s | cache own (KiB) | cache remote (KiB) |")
print("|---|---:|---:|---:|---:|")
for n, label in [("speed-single", "one device")] + [(f"speed-g{g}", f"ASTRA N=2, G={g}") for g in (1, 16, 32)]:
    s = load(n)
    print(f"| {label} | {s['time_to_first_token_ms']:.0f} | {s['decode_tokens_per_s']:.1f} | "
          f"{s['cache_bytes']['local'] / 1024:.0f} | {s['cache_bytes']['remote'] / 1024:.1f} |")
