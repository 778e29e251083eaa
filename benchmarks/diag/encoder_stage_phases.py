"""Diagnostic (H200): where the time of a Qwen2.5-VL-7B-shaped batch-1 image prefill goes, phase by phase,
for the unpruned model and hiprune @ 0.11 at the encoder stage, both with vision_compile + vision_graphs
and the language model under reduce-overhead with a static cache (the bench-encoder `--compile`
`compiled_graphs` rows). CUDA events and host clocks at the encoder's blocks, the merger and the language
model: GPU ms between the marks (a gap the GPU spends waiting for the host shows as GPU time too, so host
ms beside it). `PYTHONPATH=. python benchmarks/diag/encoder_stage_phases.py [--profile]` (about 2 minutes; `--profile`: then
cProfile and torch.profiler tables of the pruned call, and a Chrome trace under $OUT when it is set)."""
import os
import sys
import time

import torch

import prune
from prune.evaluation import models as M
from prune.evaluation.bench import _CacheMaker, _compile_language_model, _reset_rope_deltas
from prune.evaluation.tasks.shapes import random_scene, render_scene
from prune.hooks import adapter_for
from prune.hooks import vision_compile as VC
from prune.hooks import vision_graphs as VG

torch.manual_seed(0)
spec = M.resolve_model("qwen2.5-vl-7b")
dev, dt = torch.device("cuda"), torch.bfloat16
model = M.build_model(spec, device=dev, dtype=dt, attn_implementation="sdpa", seed=0)
image = render_scene(random_scene(0), size=(1344, 1344))
inp = M.make_inputs(model, M.build_image_processor(spec), [image], prompt_tokens=64, seed=0, device=dev, dtype=dt,
                    spec=spec)
cache = _CacheMaker(True, inp, 1)
_compile_language_model(model)
graphs, compiled = VG.VisionGraphs(max_shapes=64), VC.VisionCompile()
visual = model.model.visual
blocks = visual.blocks
marks: list[tuple[str, torch.cuda.Event, float]] = []


def mark(name):
    def hook(*_args, **_kwargs):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        marks.append((name, event, time.perf_counter()))
    return hook


def install_marks(cut: int):
    hooks = [visual.register_forward_pre_hook(mark("encoder start")),
             blocks[cut].register_forward_pre_hook(mark(f"block {cut} start")),
             blocks[cut].register_forward_hook(mark(f"block {cut} end (cut done)")),
             blocks[cut + 1].register_forward_pre_hook(mark(f"block {cut + 1} start")),
             blocks[-1].register_forward_hook(mark(f"block {len(blocks) - 1} end")),
             visual.register_forward_hook(mark("encoder end (merger done)"))]
    lm = adapter_for(model).language_model()
    hooks += [lm.register_forward_pre_hook(mark("language model start")),
              lm.register_forward_hook(mark("language model end"))]
    return hooks


def run(keep, stage, report=False):
    opts = {"stage": "encoder"} if stage else {}
    prune.wrap(model, "hiprune", keep=keep, vision_attention="segmented", vision_compile=True, vision_graphs=True,
               **opts)
    VC.share(model, compiled)
    VG.share(model, graphs)
    hooks = install_marks(15) if report else []
    kwargs = cache.kwargs(model)
    marks.clear()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    with torch.no_grad():
        _reset_rope_deltas(model)
        model(**inp, **kwargs, use_cache=True, logits_to_keep=1)
    end = torch.cuda.Event(enable_timing=True)
    end.record()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    for h in hooks:
        h.remove()
    if report:
        print(f"--- hiprune keep={keep} stage={stage or 'post_encoder'}: GPU {start.elapsed_time(end):.2f} ms, "
              f"host {1000 * (t1 - t0):.2f} ms; kept {int(model.prune_state.last.keep_mask.sum())} rows")
        prev_e, prev_t, prev_n = start, t0, "call start"
        for name, e, t in [*marks, ("call end", end, t1)]:
            print(f"  {prev_n:>28} -> {name:<28} GPU {prev_e.elapsed_time(e):7.2f} ms  host {1000 * (t - prev_t):7.2f} ms")
            prev_e, prev_t, prev_n = e, t, name
        print("  graphs:", {k: v for k, v in graphs.stats().items() if k != "skipped"}, "skipped:",
              sorted(graphs.stats()["skipped"]))
    prune.unwrap(model)


for _ in range(4):
    run(1.0, None)
    run(0.11, "encoder")
for _ in range(2):
    run(1.0, None, report=True)
    run(0.11, "encoder", report=True)

if "--profile" in sys.argv:  # where the pruned call's host time goes: Python functions, then torch ops
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(3):
        run(0.11, "encoder")
    profiler.disable()
    torch.cuda.synchronize()
    print("--- cProfile, 3 pruned calls (wrap + call + unwrap), by own time")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(35)
    print("--- cProfile, by cumulative time, prune's functions")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(r"prune/", 45)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        run(0.11, "encoder")
        torch.cuda.synchronize()
    print("--- torch.profiler, one pruned call, ops by self CPU time")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    print("--- the same, grouped by the Python stack (5 frames)")
    print(prof.key_averages(group_by_stack_n=5).table(sort_by="self_cpu_time_total", row_limit=25))
    out = os.environ.get("OUT")
    if out:
        prof.export_chrome_trace(os.path.join(out, "encoder_stage_pruned_trace.json"))

if "--syncs" in sys.argv:  # every synchronisation of one pruned call, with the phase and the code that makes it
    import traceback
    import warnings

    sites = []

    def _show(message, category, filename, lineno, file=None, line=None):
        phase = marks[-1][0] if marks else "call start"
        frames = [f for f in traceback.extract_stack()[:-2] if "warnings" not in f.filename]
        where = " <- ".join(f"{f.filename.split('site-packages/')[-1].split('/work/main/')[-1]}:{f.lineno} {f.name}"
                            for f in reversed(frames[-6:]))
        sites.append(f"[after {phase}] {where}")

    run(0.11, "encoder")
    hooks = install_marks(15)
    with warnings.catch_warnings():  # restores showwarning on the way out
        warnings.simplefilter("always")
        warnings.showwarning = _show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(0.11, "encoder")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for hook in hooks:
        hook.remove()
    print(f"--- synchronisations in one pruned call (wrap included): {len(sites)}")
    for site in sites:
        print("  ", site)
