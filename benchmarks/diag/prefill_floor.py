"""Diagnostic (GPU): is an eager pruned prefill's overhead over its "ideal" prune's, or the floor of any
post-encoder pruning of this model? LLaVA-1.5-7B shape, batch 8 (``--batch``), bf16, SDPA, random @ 0.11
(``--methods`` a comma list, ``--keep``). Measured round-robin (CUDA events, min and median of ``--rounds``), one
model object:

- ``unpruned``: the unwrapped model's prefill;
- ``pruned``: the model wrapped with the method (wrapped, called once and unwrapped outside the timed region);
- ``bare cut``: the unwrapped model with one forward pre-hook on its language model that gathers the
  rows the pruned run kept (an index computed once, on the device) and hands the language model
  those embeddings with a mask of ones: the least any pruning after the encoder can add, since the
  model's own code (embedding, placeholder check, masked scatter) runs as in the pruned row;
- ``encoder``: ``get_image_features`` alone; ``lm, real kept rows``: the language model on the
  embeddings the bare cut handed it; ``lm, random rows``: on random embeddings of that length (what
  ``prune bench``'s ideal times); ``ideal`` rows: encoder + each.

pruned ~ bare cut: the overhead is the model's own post-encoder work, not prune's. lm real != lm
random: the ideal's random embeddings run at another speed than real ones.
``PYTHONPATH=. python benchmarks/diag/prefill_floor.py [--batch 8] [--methods random,hiprune] [--keep 0.11]
[--rounds 15] [--json FILE]`` (about a minute on an H200; ``--model tiny-llava`` runs on a CPU)."""
import functools
import json
import statistics
import sys
import time

import torch
from _common import arg, image_batch, keep_arg

import prune

batch, keep, rounds = arg("--batch", 8), keep_arg(0.11), arg("--rounds", 15)
methods = arg("--methods", "random").split(",")
spec, dev, dt, model, inputs = image_batch(arg("--model", "llava-1.5-7b"), batch)
lm = model.model.language_model

def kept_index(name):
    """(B, kept) ascending: the rows the method keeps (every row the same count here)."""
    with torch.no_grad():
        prune.wrap(model, name, keep=keep)
        model(**inputs, use_cache=True, logits_to_keep=1)
        keep_mask = model.prune_state.last.keep_mask.to(dev)
        prune.unwrap(model)
    counts = keep_mask.sum(1)
    if not bool((counts == counts[0]).all()):
        sys.exit("the rows keep different counts: this diagnostic needs equal ones")
    return torch.nonzero(keep_mask)[:, 1].reshape(batch, int(counts[0]))


indices = {name: kept_index(name) for name in methods}
kept = next(iter(indices.values())).shape[1]
if any(i.shape[1] != kept for i in indices.values()):
    sys.exit("the methods keep different counts")
captured = {}


def bare_cut_of(index):
    def bare_cut(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        gathered = embeds.gather(1, index[..., None].expand(-1, -1, embeds.shape[-1]))
        captured.setdefault("embeds", gathered.detach().clone())
        mask = torch.ones(batch, kept, dtype=torch.long, device=dev)
        return args, dict(kwargs, inputs_embeds=gathered, attention_mask=mask, position_ids=None)
    return bare_cut


def forward():
    return model(**inputs, use_cache=True, logits_to_keep=1)


hook = lm.register_forward_pre_hook(bare_cut_of(indices[methods[0]]), with_kwargs=True)
with torch.no_grad():
    forward()
hook.remove()
real = captured["embeds"]
rand = torch.randn(real.shape, generator=torch.Generator(device=dev).manual_seed(0), device=dev, dtype=dt) * 0.02
ones = torch.ones(batch, kept, dtype=torch.long, device=dev)


def timed(fn) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def pruned(name):
    prune.wrap(model, name, keep=keep)
    try:
        forward()  # the wrap's plans made untimed: the steady state (see prune bench)
        return timed(forward)
    finally:
        prune.unwrap(model)


def bare(name):
    h = lm.register_forward_pre_hook(bare_cut_of(indices[name]), with_kwargs=True)
    try:
        return timed(forward)
    finally:
        h.remove()


configs = {"unpruned": lambda: timed(forward)}
for name in methods:
    configs[f"pruned ({name}@{keep})"] = functools.partial(pruned, name)
    configs[f"bare cut ({name}'s rows)"] = functools.partial(bare, name)
configs |= {
    "encoder": lambda: timed(lambda: model.model.get_image_features(pixel_values=inputs["pixel_values"])),
    "lm, real kept rows": lambda: timed(lambda: model(inputs_embeds=real, attention_mask=ones, use_cache=True,
                                                      logits_to_keep=1)),
    "lm, random rows": lambda: timed(lambda: model(inputs_embeds=rand, attention_mask=ones, use_cache=True,
                                                   logits_to_keep=1)),
}
times = {name: [] for name in configs}
with torch.no_grad():
    for r in range(rounds + 2):
        for name, fn in configs.items():
            value = fn()
            if r >= 2:
                times[name].append(value)
rows = {name: {"min_ms": min(v), "median_ms": statistics.median(v)} for name, v in times.items()}
enc = rows["encoder"]
for lm_name in ("lm, real kept rows", "lm, random rows"):
    rows[f"ideal = encoder + {lm_name}"] = {k: enc[k] + rows[lm_name][k] for k in ("min_ms", "median_ms")}
print(f"{spec.name} shape, batch {batch}, {str(dt)[6:]}, SDPA, eager, {kept} rows kept, min / median of {rounds} "
      f"rounds (round-robin)")
print("| row | min ms | median ms |\n|---|---:|---:|")
for name, r in rows.items():
    print(f"| {name} | {r['min_ms']:.2f} | {r['median_ms']:.2f} |")
if "--json" in sys.argv:
    with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
        json.dump({"model": spec.name, "batch": batch, "methods": methods, "keep": keep, "kept": kept, "rounds": rounds,
                   "rows": rows}, f, indent=1)
