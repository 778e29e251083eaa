"""Diagnostic (H200): the Qwen2.5-VL-7B-shaped prefill with vision_compile=True, call by call: ms, the owner's
compiled / eager / capped calls, graphs, dynamo counters; run with TORCH_LOGS=recompiles to see why each
graph was compiled. `PYTHONPATH=. python benchmarks/diag/vision_compile_rows.py` (about 1 minute)."""
import time

import torch

import prune
from prune.evaluation import models as M
from prune.evaluation.bench import _reset_rope_deltas
from prune.evaluation.tasks.shapes import random_scene, render_scene
from prune.hooks import vision_compile as VC

torch.manual_seed(0)
spec = M.resolve_model("qwen2.5-vl-7b")
dev, dt = torch.device("cuda"), torch.bfloat16
model = M.build_model(spec, device=dev, dtype=dt, attn_implementation="sdpa", seed=0)
image = render_scene(random_scene(0), size=(1344, 1344))
frames = [render_scene(random_scene(1 + i), size=(448, 448)) for i in range(32)]
proc = M.build_image_processor(spec)
inp = {"image": M.make_inputs(model, proc, [image], prompt_tokens=64, seed=0, device=dev, dtype=dt, spec=spec),
       "video": M.make_video_inputs(model, spec, frames, prompt_tokens=64, seed=0, device=dev, dtype=dt, copies=1)}


def counters():
    from torch._dynamo.utils import counters as c
    return {k: sum(v.values()) for k, v in c.items() if k in ("frames", "stats", "recompiles", "graph_break")}


def call(owner, modality, keep, stage, profile=False):
    opts = {"stage": "encoder"} if stage else {}
    prune.wrap(model, "hiprune", keep=keep, vision_attention="segmented", vision_compile=True, **opts)
    VC.share(model, owner)
    before = dict(owner.counts), owner.graphs, counters()
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        _reset_rope_deltas(model)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof
            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                model(**inp[modality], use_cache=True, logits_to_keep=1)
                torch.cuda.synchronize()
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
        else:
            model(**inp[modality], use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    ms = 1000 * (time.perf_counter() - t)
    delta = {k: owner.counts[k] - before[0][k] for k in owner.counts}
    print(f"{modality} keep={keep} stage={stage}: {ms:.1f} ms; calls {delta}, graphs {before[1]}->{owner.graphs}, "
          f"failed={owner.failed}; dynamo {before[2]} -> {counters()}", flush=True)
    prune.unwrap(model)


owner = VC.VisionCompile()
rows = [("image", 1.0, None), ("image", 0.11, "encoder"), ("video", 1.0, None), ("video", 0.11, "encoder")]
for r in range(4):
    print(f"--- round {r}")
    for row in rows[r % 4:] + rows[:r % 4]:
        call(owner, *row)
call(owner, "image", 0.11, "encoder", profile=True)
print("=== fresh owner, image only")
owner2 = VC.VisionCompile()
for _ in range(3):
    call(owner2, "image", 1.0, None)
    call(owner2, "image", 0.11, "encoder")
