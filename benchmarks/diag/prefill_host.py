"""Diagnostic (CPU): prune's host time per prefill forward of each vision-side method. A tiny LLaVA
built in code (``--batch`` prompts of one image each, default 1), ``model(**inputs)`` with the default dynamic cache. On a tiny model
every operation is host time, so wrapped - unwrapped is prune's per-prefill cost: the statistics tap,
the selection and the cut. It bounds the eager batch-1 ratio to ideal of a launch-bound model (LLaVA-1.5-7B
on the H200: host ~ GPU ~ 28 ms per prefill, so 0.85 ms of prune host time is a ratio of 0.97).

Round-robin (../shared/MEASURING.md): every round times the unwrapped model, then the model wrapped with
each method at keep 0.3, each timing the min of 5 forwards; 20 rounds after 2 warm-up rounds; min, median
and spread per configuration, and prune's extra (wrapped - unwrapped, of the mins and of the medians). ``PYTHONPATH=. python benchmarks/diag/prefill_host.py
[--methods random,pool,cls,hiprune] [--batch 1] [--json FILE]`` (about half a minute)."""
import json
import sys
import time

import torch
from _host_timing import round_robin, summarize

import prune
from tests.conftest import Case

torch.set_num_threads(1)
batch = int(sys.argv[sys.argv.index("--batch") + 1]) if "--batch" in sys.argv else 1
case = Case("llava", attn="sdpa", prompts=((0,),) * batch, text_lens=(9,) * batch, seed=0)
model, inputs = case.model, case.inputs()
methods = ["random", "pool", "cls", "hiprune"]
if "--methods" in sys.argv:
    methods = sys.argv[sys.argv.index("--methods") + 1].split(",")


def forward_us(repeats: int = 5) -> float:
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            t = time.perf_counter()
            model(**inputs, use_cache=True, logits_to_keep=1)
            best = min(best, time.perf_counter() - t)
    return best * 1e6


def wrapped_us(method: str) -> float:
    prune.wrap(model, method, keep=0.3)
    try:
        forward_us(1)  # the wrap's first call builds what it caches
        return forward_us()
    finally:
        prune.unwrap(model)


rounds, warmup = 20, 2
configs = {"unwrapped": forward_us} | {m: (lambda m=m: wrapped_us(m)) for m in methods}
rows = summarize(round_robin(configs, rounds, warmup), "unwrapped")
print(f"prefill forward, tiny LLaVA, batch {batch}, {rounds} rounds round-robin after {warmup} warm-up")
print("| config | min us | median us | spread | prune's extra: min / median us |\n|---|---:|---:|---:|---:|")
for name, row in rows.items():
    extra = "" if name == "unwrapped" else f"+{row['extra_min_us']:.0f} / +{row['extra_median_us']:.0f}"
    label = name if name == "unwrapped" else f"{name} @ 0.3"
    print(f"| {label} | {row['min_us']:.0f} | {row['median_us']:.0f} | {100 * row['spread']:.0f} % | {extra} |")
if "--json" in sys.argv:
    with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
        json.dump({"rows": rows, "rounds": rounds, "warmup": warmup, "batch": batch, "torch": torch.__version__}, f, indent=1)
