"""Diagnostic (CPU or GPU): prune's host time per static-cache decode step. A tiny LLaVA built in code,
greedy generate with ``cache_implementation="static"``; per-step time = (time of N new tokens - time of
1) / (N - 1), best of 5, unwrapped vs wrapped with random @ 0.3 (a vision-side method: the decode
steps only map positions and masks). On a tiny model every step is host time, so the difference is
prune's per-step cost. ``PYTHONPATH=. python benchmarks/diag/decode_step_host.py`` (about a minute)."""
import time

import torch

import prune
from tests.conftest import Case

torch.set_num_threads(1)
case = Case("llava", attn="sdpa", prompts=((0,),), text_lens=(9,), seed=0)
model, inputs = case.model, case.inputs()


def per_step_us(n: int = 96, reps: int = 5) -> float:
    best = float("inf")
    for _ in range(reps):
        with torch.no_grad():
            t = time.perf_counter()
            model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, cache_implementation="static")
            many = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(**inputs, max_new_tokens=1, min_new_tokens=1, do_sample=False, cache_implementation="static")
            one = time.perf_counter() - t
        best = min(best, (many - one) / (n - 1))
    return best * 1e6


for _ in range(2):
    unwrapped = per_step_us()
    prune.wrap(model, "random", keep=0.3)
    wrapped = per_step_us()
    prune.unwrap(model)
    print(f"decode step, tiny LLaVA, static cache: unwrapped {unwrapped:.0f} us, wrapped {wrapped:.0f} us "
          f"(prune: +{wrapped - unwrapped:.0f} us)")
