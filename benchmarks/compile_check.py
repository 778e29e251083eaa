"""How many graphs torch.compile makes of a pruned model's generate, against the unpruned model.

For the unpruned model and each method: wrap, give the language model a static cache (first used
eagerly, so its buffers are static addresses), compile the language model's forward as
``prune bench --compile`` does (mode="reduce-overhead" on CUDA; in-LLM methods compile the decode
step only), then count what dynamo compiles during a 1-token generate (the prefill) and a
``--new-tokens`` generate (the decode step), and during a second such generate (nothing, when no
step recompiles). Also graph breaks, CUDA-graph skips, and whether the tokens equal the uncompiled
wrapped model's. Prints a table and writes JSON.

    python benchmarks/compile_check.py --model llava-1.5-7b --methods random,hiprune,fastv --keep 64
    python benchmarks/compile_check.py --model tiny-llava --device cpu --dtype float32   # backend "eager"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

import prune
from prune._compat import cache_parameter
from prune.evaluation import bench as B
from prune.evaluation import models as M
from prune.methods import get_method


def _generate(model, inputs, n: int, cache) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, disable_compile=True,
                              pad_token_id=model.generation_config.pad_token_id,
                              **{cache_parameter(model.forward): cache})


def check(model, inputs, method: str, keep, new_tokens: int, device: torch.device) -> dict:
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    in_llm = method != "none" and bool(getattr(get_method(method), "in_llm", False))
    if method != "none":
        prune.wrap(model, method, keep=keep)
    try:
        cache = StaticCache(config=model.config, max_cache_len=int(inputs["input_ids"].shape[1]) + new_tokens + 8)
        eager = _generate(model, inputs, new_tokens, cache)  # first use eager: static addresses
        torch._dynamo.reset()
        counters.clear()
        options = {} if device.type == "cuda" else {"backend": "eager", "mode": None}  # CUDA: reduce-overhead
        B._compile_language_model(model, prefill=not in_llm, **options)

        def graphs() -> int:
            return counters["stats"]["unique_graphs"]

        t0 = time.perf_counter()
        cache.reset()
        _generate(model, inputs, 1, cache)
        prefill_graphs = graphs()
        cache.reset()
        out = _generate(model, inputs, new_tokens, cache)
        decode_graphs = graphs() - prefill_graphs
        cache.reset()
        again = _generate(model, inputs, new_tokens, cache)
        row = {
            "method": method,
            "keep": keep if method != "none" else 1.0,
            "compiled": "decode" if in_llm else "prefill+decode",
            "prefill_graphs": prefill_graphs,
            "decode_graphs": decode_graphs,
            "second_call_graphs": graphs() - prefill_graphs - decode_graphs,
            "graph_breaks": sum(counters["graph_break"].values()),
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"],
            "tokens_equal_eager": out.tolist() == eager.tolist() and again.tolist() == eager.tolist(),
            "compile_s": round(time.perf_counter() - t0, 1),
        }
    finally:
        lm = B._language_model(model)
        lm.__dict__.pop("forward", None)
        if method != "none":
            prune.unwrap(model)
        torch._dynamo.reset()
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llava-1.5-7b")
    parser.add_argument("--methods", default="random,hiprune,fastv")
    parser.add_argument("--keep", default="64", help="a fraction in (0, 1] or a token count")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(M.DTYPES))
    parser.add_argument("--attn", default="sdpa")
    parser.add_argument("--json", default=None, help="where to write the rows (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    keep = float(args.keep) if "." in args.keep else int(args.keep)
    device = torch.device(args.device)
    spec = M.resolve_model(args.model)
    model = M.build_model(spec, device=device, dtype=M.DTYPES[args.dtype], attn_implementation=args.attn)
    processor = M.build_image_processor(spec)
    from prune.evaluation.tasks.shapes import random_scene, render_scene

    height, width = spec.image_size
    images = [render_scene(random_scene(b), size=(width, height)) for b in range(args.batch)]
    inputs = M.make_inputs(model, processor, images, prompt_tokens=args.prompt_tokens, seed=0, device=device,
                           dtype=M.DTYPES[args.dtype], spec=spec)
    rows = []
    with torch._dynamo.config.patch(cache_size_limit=64, accumulated_cache_size_limit=512):
        for method in ["none"] + [m for m in args.methods.split(",") if m]:
            try:
                rows.append(check(model, inputs, method, keep, args.new_tokens, device))
            except (TypeError, ValueError) as exc:  # not supported on this model: say why, go on
                rows.append({"method": method, "keep": keep, "compiled": f"unsupported: {exc}"})
            print(json.dumps(rows[-1]), flush=True)
    keys = list(rows[0])
    print("\n| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row.get(k, "")) for k in keys) + " |")
    path = Path(args.json or f"benchmarks/results/compile_check_{args.model}_{B._slug(B._device_name(device))}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": args.model, "device": B._device_name(device), "torch": torch.__version__,
                                "transformers": __import__("transformers").__version__,
                                "new_tokens": args.new_tokens, "batch": args.batch, "rows": rows}, indent=1))
    print(f"wrote {path}")
    bad = [r for r in rows if "decode_graphs" in r and (r["decode_graphs"] > 1 or r["second_call_graphs"]
                                                         or not r["tokens_equal_eager"] or r["cudagraph_skips"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
