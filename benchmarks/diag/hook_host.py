"""Diagnostic (CPU): the host time of prune's own hooks per prefill forward: the multimodal forward's
pre-hook (the prompt read to the host), the selection made at the end of the feature function
(``Adapter._select_early``) and the language-model hook (the cut). Inclusive wall time of each entry
point, summed per forward; the statistics taps (which run inside the encoder's attention) and the
model's own code are not in it. A tiny LLaVA shape (``tiny-llava``, random weights), ``--batch``
prompts of one image each, keep 0.11, the min over 3 blocks of 40 forwards after 5 warm-up ones.

This is the work an eager, launch-bound prefill pays on top of a bare cut (``prefill_floor.py``).
Compare two checkouts by running this file of one with the other's package first on the path:
``PYTHONPATH=OTHER:. python benchmarks/diag/hook_host.py``.
``PYTHONPATH=. python benchmarks/diag/hook_host.py [--methods random,cls,hiprune] [--batch 8] [--json FILE]``
(about 20 seconds)."""
import collections
import functools
import json
import sys
import time

import torch
from _common import arg, image_batch

import prune
from prune.hooks import base

ENTRY_POINTS = ("_on_multimodal_call", "_select_early", "_on_language_model_call")
torch.set_num_threads(1)
batch, methods = arg("--batch", 8), arg("--methods", "random,cls,hiprune").split(",")
spec, dev, dt, model, inputs = image_batch("tiny-llava", batch)
spent: collections.Counter = collections.Counter()


def timed(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter_ns()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name] += time.perf_counter_ns() - start
    return wrapper


originals = {name: getattr(base.Adapter, name) for name in ENTRY_POINTS}
for name, fn in originals.items():
    setattr(base.Adapter, name, timed(name, fn))
rows = {}
try:
    for method in methods:
        prune.wrap(model, method, keep=0.11)
        best: dict[str, float] = {}
        with torch.no_grad():
            for _ in range(5):
                model(**inputs, use_cache=True, logits_to_keep=1)
            for _ in range(3):
                spent.clear()
                for _ in range(40):
                    model(**inputs, use_cache=True, logits_to_keep=1)
                total = sum(spent.values()) / 40 / 1e3
                if total < best.get("total_us", float("inf")):
                    best = {name: spent[name] / 40 / 1e3 for name in ENTRY_POINTS} | {"total_us": total}
        prune.unwrap(model)
        rows[method] = best
finally:
    for name, fn in originals.items():
        setattr(base.Adapter, name, fn)
print(f"prune's hooks per prefill forward (us), tiny LLaVA, batch {batch}, keep 0.11, min of 3 x 40 forwards")
print("| method | " + " | ".join(ENTRY_POINTS) + " | total |\n|---|" + "---:|" * (len(ENTRY_POINTS) + 1))
for method, row in rows.items():
    print(f"| {method} | " + " | ".join(f"{row[n]:.0f}" for n in ENTRY_POINTS) + f" | {row['total_us']:.0f} |")
if "--json" in sys.argv:
    with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
        json.dump({"batch": batch, "keep": 0.11, "rows": rows, "torch": torch.__version__}, f, indent=1)
