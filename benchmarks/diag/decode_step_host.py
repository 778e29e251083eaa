"""Diagnostic (CPU or GPU): prune's host time per static-cache decode step. A tiny LLaVA built in code,
greedy generate with ``cache_implementation="static"``; per-step time = (time of N new tokens - time of
1) / (N - 1). Round-robin (../shared/MEASURING.md): every round times the unwrapped model, then the
same model wrapped with random @ 0.3 (a vision-side method: its decode steps only map positions and
masks), 20 rounds after 2 warm-up rounds; min, median and spread per configuration. On a tiny model
every step is host time, so the difference is prune's per-step cost.
``PYTHONPATH=. python benchmarks/diag/decode_step_host.py [--json FILE]`` (about a minute)."""
import json
import sys
import time

import torch
from _host_timing import round_robin, summarize

import prune
from tests.conftest import Case

torch.set_num_threads(1)
case = Case("llava", attn="sdpa", prompts=((0,),), text_lens=(9,), seed=0)
model, inputs = case.model, case.inputs()


def per_step_us(n: int = 160) -> float:
    gen = {"do_sample": False, "cache_implementation": "static"}
    with torch.no_grad():
        t = time.perf_counter()
        model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **gen)
        many = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, **gen)
        one = time.perf_counter() - t
    return (many - one) / (n - 1) * 1e6


def wrapped_us() -> float:
    prune.wrap(model, "random", keep=0.3)
    try:
        return per_step_us()
    finally:
        prune.unwrap(model)


rounds, warmup = 20, 2
rows = summarize(round_robin({"unwrapped": per_step_us, "random@0.3": wrapped_us}, rounds, warmup), "unwrapped")
print(f"decode step, tiny LLaVA, static cache, {rounds} rounds round-robin after {warmup} warm-up")
print("| config | min us | median us | spread |\n|---|---:|---:|---:|")
for name, row in rows.items():
    print(f"| {name} | {row['min_us']:.0f} | {row['median_us']:.0f} | {100 * row['spread']:.0f} % |")
extra = rows["random@0.3"]
print(f"prune per decode step: +{extra['extra_min_us']:.0f} us (min) / +{extra['extra_median_us']:.0f} us (median)")
if "--json" in sys.argv:
    with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
        json.dump({"rows": rows, "rounds": rounds, "warmup": warmup}, f, indent=1)
