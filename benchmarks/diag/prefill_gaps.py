"""Diagnostic (GPU): where an eager pruned prefill loses time against its ideal. LLaVA-1.5-7B shape,
batch 8 (``--batch``), bf16, SDPA; random @ 0.11 (``--method``, ``--keep``). Under torch.profiler, one
forward each of: the pruned model, the unwrapped vision encoder alone, and the ideal (the unwrapped
model on embeddings of the kept length, as ``prune bench`` builds it). For each: wall ms, the GPU's
kernel ms (summed), its idle ms inside the forward (wall - the union of kernel intervals) and the
largest idle gaps with the host op that ended each. If the pruned forward's kernel ms is about the
encoder's plus the ideal's, its overhead is idle time (the GPU waiting for the host after a
synchronisation); otherwise the top kernels tell what it adds.
``--compile``: every forward with a static cache and the language model under
``torch.compile(mode="reduce-overhead")``, as ``prune bench --compile`` runs it (CUDA only).
``--host``: also the Python functions that take the host's time in the pruned and the unpruned forward
(cProfile, own time, summed over 5 forwards): where a pruned row's extra host time goes.
``PYTHONPATH=. python benchmarks/diag/prefill_gaps.py [--model llava-1.5-7b] [--batch 8] [--method random]
[--keep 0.11] [--compile] [--host] [--json FILE]`` (about a minute on an H200; ``--model tiny-llava`` runs on a
CPU as a smoke test, with no kernel times)."""
import contextlib
import cProfile
import json
import pstats
import sys

import torch
from _common import arg, image_batch, keep_arg
from torch.profiler import ProfilerActivity, profile

import prune
from prune.evaluation.bench import _CacheMaker, _compile_language_model, _reset_rope_deltas

batch, method, keep = arg("--batch", 8), arg("--method", "random"), keep_arg(0.11)
compiled = "--compile" in sys.argv
spec, dev, dt, model, inputs = image_batch(arg("--model", "llava-1.5-7b"), batch)


caches = _CacheMaker(compiled, inputs, 1)
if compiled:
    _compile_language_model(model)


def pruned():  # wrapped or not (the unpruned forward)
    _reset_rope_deltas(model)
    return model(**inputs, use_cache=True, logits_to_keep=1, **caches.kwargs(model))


def encoder():
    return model.model.get_image_features(pixel_values=inputs["pixel_values"])


prune.wrap(model, method, keep=keep)
with torch.no_grad():
    pruned()
kept = int(model.prune_state.last.keep_mask.sum(1).max())
prune.unwrap(model)
embeds = torch.randn(batch, kept, model.config.text_config.hidden_size, device=dev, dtype=dt) * 0.02
mask = torch.ones(batch, kept, dtype=torch.long, device=dev)


def ideal():
    return model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1, **caches.kwargs(model))


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def warmed(fn, wrap: bool):
    """``fn`` run 3 times (the model wrapped first if ``wrap``, unwrapped after), synchronised."""
    if wrap:
        prune.wrap(model, method, keep=keep)
    try:
        with torch.no_grad():
            for _ in range(3):
                fn()
            sync()
            yield
    finally:
        if wrap:
            prune.unwrap(model)


def profiled(fn, wrap: bool):
    with warmed(fn, wrap):
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
        with profile(activities=activities) as prof:
            fn()
            sync()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > 0]
    host = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    spans = sorted((e.time_range.start, e.time_range.end, e.name) for e in events)
    busy, gaps, last_end = 0.0, [], None
    for start, end, _ in spans:
        if last_end is not None and start > last_end:
            gaps.append((start - last_end, last_end))
        if last_end is None or end > last_end:
            busy += end - max(start, last_end if last_end is not None else start)
            last_end = end
    kernel = sum(end - start for start, end, _ in spans)
    wall = spans[-1][1] - spans[0][0] if spans else 0.0
    by_name: dict[str, float] = {}
    for start, end, name in spans:
        by_name[name[:70]] = by_name.get(name[:70], 0.0) + (end - start)

    def ended_before(t):  # the host op whose end is closest before the gap's start
        best = None
        for e in host:
            if e.time_range.end <= t and (best is None or e.time_range.end > best.time_range.end):
                best = e
        return best.name if best is not None else "?"

    top_gaps = [(round(g / 1e3, 3), ended_before(t)) for g, t in sorted(gaps, reverse=True)[:6]]
    return {"wall_ms": wall / 1e3, "kernel_ms": kernel / 1e3, "busy_ms": busy / 1e3, "idle_ms": (wall - busy) / 1e3,
            "top_gaps_ms": top_gaps,
            "top_kernels_ms": sorted(((round(v / 1e3, 3), k) for k, v in by_name.items()), reverse=True)[:8]}


def host_functions(fn, wrap: bool, top: int = 15) -> list[tuple[float, int, str]]:
    """(own ms per forward, calls per forward, function) of the ``top`` functions by own host time."""
    with warmed(fn, wrap):
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            fn()
        sync()
        profiler.disable()
    stats = pstats.Stats(profiler).stats
    ranked = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [(round(v[2] * 1e3 / 5, 3), v[1] // 5, f"{k[0].split('site-packages/')[-1]}:{k[1]}:{k[2]}") for k, v in ranked]


rows = {f"{method}@{keep}": profiled(pruned, True), "encoder": profiled(encoder, False), f"ideal ({kept} rows)": profiled(ideal, False)}
mode = "LM reduce-overhead, static cache" if compiled else "eager"
print(f"{spec.name} shape, batch {batch}, {str(dt)[6:]}, SDPA, {mode}: one profiled forward each (after 3 warm-ups)")
print("| forward | wall ms | kernel ms | GPU busy ms | GPU idle ms |\n|---|---:|---:|---:|---:|")
for name, r in rows.items():
    print(f"| {name} | {r['wall_ms']:.1f} | {r['kernel_ms']:.1f} | {r['busy_ms']:.1f} | {r['idle_ms']:.1f} |")
for name, r in rows.items():
    print(f"\n{name}: largest idle gaps (ms, host op before): {r['top_gaps_ms']}")
    print(f"{name}: top kernels (ms): {r['top_kernels_ms']}")
host = {}
if "--host" in sys.argv:
    host = {f"{method}@{keep}": host_functions(pruned, True), "unpruned": host_functions(pruned, False)}  # the same call, unwrapped
    for name, functions in host.items():
        print(f"\n{name}: host functions by own time (ms per forward, calls per forward, function)")
        for own, calls, where in functions:
            print(f"  {own:8.3f} {calls:6d}  {where}")
if "--json" in sys.argv:
    with open(sys.argv[sys.argv.index("--json") + 1], "w") as f:
        json.dump({"model": spec.name, "batch": batch, "method": method, "keep": keep, "compile": compiled, "rows": rows,
                   "host_functions": host}, f, indent=1)
