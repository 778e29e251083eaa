"""Count CUDA synchronisations of one prefill: the unwrapped model, the wrapped model, and inside
prune's window (from the encoder's statistics to the language model's input), on the tiny models.

    python benchmarks/sync_count.py --out sync_count.json

Prints a table and writes JSON lines. Counts come from ``torch.cuda.set_sync_debug_mode("warn")``
(one warning per synchronising call).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import prune  # noqa: E402
from prune.hooks import base  # noqa: E402

CASES = [("llava", m) for m in ("random", "pool", "cls", "hiprune")]
CASES += [("llava_next", m) for m in ("random", "pool", "cls", "hiprune")]
CASES += [("qwen2_5_vl", m) for m in ("random", "pool", "hiprune")]


class Counter:
    def __init__(self) -> None:
        self.inside = 0
        self.window = 0
        self.total = 0

    def __call__(self, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            self.inside += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.inside -= 1

        return inner


def count(fn, counter: Counter | None = None) -> int:
    """Synchronising calls made by ``fn()`` (and, with a counter, those inside prune's window)."""
    total = 0

    def show(message, category, filename, lineno, file=None, line=None):
        nonlocal total
        if "synchroniz" in str(message):
            total += 1
            if counter is not None and counter.inside:
                counter.window += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="sync_count.json")
    args = parser.parse_args()
    from tests.test_select_batch import _family_cases

    counter = Counter()
    base.Adapter._on_language_model_call = counter(base.Adapter._on_language_model_call)
    base.Adapter._collect = counter(base.Adapter._collect)
    rows = []
    with open(args.out, "w") as out, torch.no_grad():
        for family, method in CASES:
            model, inputs = _family_cases()[family][0]()
            model = model.cuda()
            inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
            model(**inputs)
            unwrapped = count(functools.partial(model, **inputs))
            prune.wrap(model, method, keep=0.3)
            model(**inputs)  # warm-up
            counter.window = 0
            wrapped = count(functools.partial(model, **inputs), counter)
            row = {"family": family, "method": method, "unwrapped": unwrapped, "wrapped": wrapped,
                   "in_prune_window": counter.window}
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
    print(f"{'family':<12} {'method':<8} {'unwrapped':>9} {'wrapped':>8} {'in window':>9}")
    for r in rows:
        print(f"{r['family']:<12} {r['method']:<8} {r['unwrapped']:>9} {r['wrapped']:>8} {r['in_prune_window']:>9}")


if __name__ == "__main__":
    main()
