"""Benchmark of the Triton kernels in :mod:`prune.kernels` against plain-torch paths (CUDA only).

    python -m prune.evaluation.bench_kernels [--out DIR] [--ns 577,2304,4096,16384,32768] [--dims 64,80]

For bf16, B=1, H=16 and each head dim / sequence length it measures, side by side in one run:

* ``attention_stats`` over all query rows: time and peak memory, against (a) the materialized path
  ``softmax(Q K^T * scale)`` reduced over heads and rows (an N x N buffer per head), and (b) the
  forward of ``torch.nn.functional.scaled_dot_product_attention`` on the same q, k and a v of the same
  shape (what the layer itself costs); out-of-memory is caught and reported as OOM;
* the CLS row (``query_index=[0]``) and a 32-row query subset, against the materialized path on those
  rows (``softmax(Q[rows] K^T)``), and as a fraction of the SDPA forward;
* ``topk_gather`` and ``transition_variation`` against their references (bandwidth-bound).

Times are medians of CUDA-event-timed runs after warm-up (``triton.testing.do_bench``, which also
flushes the L2 cache between runs). Peak memory is the allocator's peak above what was allocated
before the call. Writes ``kernels_<gpu>.json`` and ``kernels_<gpu>.md`` to ``--out``
(default ``benchmarks/results/``) and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

OOM = "OOM"


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _cleanup() -> None:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def measure(fn, *, warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    """{'ms': median time, 'peak_mb': peak extra memory} or {'ms': 'OOM', ...}."""
    import triton.testing

    _cleanup()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        out = fn()  # compile / first run, and the peak-memory probe
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        del out
        ms = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    except Exception as exc:  # noqa: BLE001 - OOM surfaces as several exception types
        if not _is_oom(exc):
            raise
        _cleanup()
        return {"ms": OOM, "peak_mb": OOM}
    _cleanup()
    return {"ms": float(ms), "peak_mb": float(peak)}


def host_us(fn, calls: int = 50) -> float:
    """Host (Python + launch) time per call in microseconds, without waiting for the GPU."""
    import time

    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e6


def measure_graph(fn, *, warmup_ms: float = 25, rep_ms: float = 100):
    """Median time of a CUDA-graph replay of ``fn`` (GPU time without Python/launch overhead), in ms;
    None when ``fn`` cannot be captured."""
    import triton.testing

    try:
        fn()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = triton.testing.do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    except Exception as exc:  # noqa: BLE001
        _cleanup()
        if _is_oom(exc):
            return OOM
        return None
    del graph
    _cleanup()
    return float(ms)


def materialized_stats(q, k, scale, rows=None):
    """The N x N path: softmax(Q K^T * scale) in fp32, averaged over heads and the chosen rows."""
    if rows is not None:
        q = q[:, :, rows]
    logits = torch.matmul(q, k.transpose(-1, -2))
    p = torch.softmax(logits.float() * scale, dim=-1)
    return p.mean(dim=1).mean(dim=1)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _fmt(x, spec=".3f") -> str:
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return format(x, spec)


def _ratio(a, b):
    if isinstance(a, str) or isinstance(b, str) or a is None or b is None or b == 0:
        return None
    return a / b


def _bench_attention_one(d: int, n: int, heads: int, batch: int, gen, seed: int) -> dict:
    from prune.kernels import attention_stats

    shape = (batch, heads, n, d)
    q = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen)
    scale = d**-0.5
    q32 = torch.randperm(n, generator=torch.Generator().manual_seed(seed + n))[:32].sort().values
    q32_dev = q32.cuda()
    r = {"d": d, "n": n, "batch": batch, "heads": heads}
    r["stats_all"] = measure(lambda: attention_stats(q, k))
    r["sdpa"] = measure(lambda: F.scaled_dot_product_attention(q, k, v))
    r["mat_all"] = measure(lambda: materialized_stats(q, k, scale))
    r["stats_cls"] = measure(lambda: attention_stats(q, k, query_index=[0]))
    r["mat_cls"] = measure(lambda: materialized_stats(q, k, scale, rows=[0]))
    r["stats_q32"] = measure(lambda: attention_stats(q, k, query_index=q32))
    r["mat_q32"] = measure(lambda: materialized_stats(q, k, scale, rows=q32_dev))
    r["host_us"] = {
        "stats_all": host_us(lambda: attention_stats(q, k)),
        "stats_cls": host_us(lambda: attention_stats(q, k, query_index=[0])),
        "stats_q32": host_us(lambda: attention_stats(q, k, query_index=q32)),
        "sdpa": host_us(lambda: F.scaled_dot_product_attention(q, k, v)),
    }
    # GPU time alone (CUDA-graph replay): what the kernels cost once launch overhead is hidden
    r["graph_ms"] = {
        "stats_all": measure_graph(lambda: attention_stats(q, k)),
        "sdpa": measure_graph(lambda: F.scaled_dot_product_attention(q, k, v)),
        "stats_cls": measure_graph(lambda: attention_stats(q, k, query_index=[0])),
        "stats_q32": measure_graph(lambda: attention_stats(q, k, query_index=q32)),
    }
    # accuracy against the materialized path where it fits
    try:
        if r["mat_all"]["ms"] != OOM:
            r["rel_err_all"] = _rel_err(attention_stats(q, k), materialized_stats(q, k, scale))
        r["rel_err_q32"] = _rel_err(
            attention_stats(q, k, query_index=q32), materialized_stats(q, k, scale, rows=q32_dev)
        )
    except Exception as exc:  # noqa: BLE001
        if not _is_oom(exc):
            raise
    r["stats_over_sdpa"] = _ratio(r["stats_all"]["ms"], r["sdpa"]["ms"])
    r["mat_over_stats"] = _ratio(r["mat_all"]["ms"], r["stats_all"]["ms"])
    r["q32_over_sdpa"] = _ratio(r["stats_q32"]["ms"], r["sdpa"]["ms"])
    r["cls_over_sdpa"] = _ratio(r["stats_cls"]["ms"], r["sdpa"]["ms"])
    g = r["graph_ms"]
    r["graph_stats_over_sdpa"] = _ratio(g["stats_all"], g["sdpa"])
    r["graph_q32_over_sdpa"] = _ratio(g["stats_q32"], g["sdpa"])
    r["graph_cls_over_sdpa"] = _ratio(g["stats_cls"], g["sdpa"])
    return r


def bench_attention(dims, ns, heads=16, batch=1, seed=0) -> list[dict]:
    rows_out = []
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for d in dims:
        for n in ns:
            r = _bench_attention_one(d, n, heads, batch, gen, seed)
            _cleanup()
            rows_out.append(r)
            print(
                f"d={d:3d} N={n:6d} stats {_fmt(r['stats_all']['ms'])} ms | sdpa {_fmt(r['sdpa']['ms'])} | "
                f"mat {_fmt(r['mat_all']['ms'])} | cls {_fmt(r['stats_cls']['ms'])} | "
                f"q32 {_fmt(r['stats_q32']['ms'])} | err {_fmt(r.get('rel_err_all'), '.1e')} | "
                f"graph {r['graph_ms']} | host_us {r['host_us']}",
                flush=True,
            )
    return rows_out


def _bench_other_one(b: int, n: int, dim: int, keep: int, gen) -> list[dict]:
    from prune.kernels import (
        topk_gather,
        topk_gather_reference,
        transition_variation,
        transition_variation_reference,
    )

    x = torch.randn(b, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    y = torch.randn(b, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    s = torch.randn(b, n, device="cuda", generator=gen)
    shape = [b, n, dim]
    t = measure(lambda: topk_gather(x, s, keep))
    ref = measure(lambda: topk_gather_reference(x, s, keep))
    out = [{"op": "topk_gather", "shape": shape, "k": keep, "triton": t, "reference": ref}]
    t = measure(lambda: transition_variation(x, y))
    ref = measure(lambda: transition_variation_reference(x, y))
    nbytes = 2 * x.numel() * x.element_size()
    gbs = None if t["ms"] == OOM else nbytes / (t["ms"] * 1e-3) / 1e9
    out.append(
        {"op": "transition_variation", "shape": shape, "triton": t, "reference": ref, "triton_gb_s": gbs}
    )
    return out


def bench_other(seed=0) -> list[dict]:
    out = []
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for b, n, dim, keep in [(1, 4096, 1024, 1024), (2, 16384, 4096, 4096)]:
        out += _bench_other_one(b, n, dim, keep, gen)
        _cleanup()
    return out


_LSE_OPTS = [  # (BLOCK_M rows, BLOCK_N keys, warps, stages)
    (64, 128, 4, 3),
    (64, 128, 4, 4),
    (64, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (128, 64, 4, 3),
    (64, 256, 8, 3),
]
_COL_OPTS = [  # (BLOCK_N keys, BLOCK_M rows, warps, stages)
    (64, 128, 4, 3),
    (64, 128, 4, 4),
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (128, 128, 8, 3),
    (64, 64, 4, 3),
    (64, 256, 8, 3),
]


def _time_config(q, k, cfg, query_index=None):
    import triton.testing

    from prune.kernels.attention_stats import attention_stats_triton

    def fn():
        return attention_stats_triton(q, k, query_index=query_index, config=cfg)

    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory for a large tile
        return f"error: {type(exc).__name__}: {str(exc)[:80]}"
    ms = measure_graph(fn, warmup_ms=10, rep_ms=40)  # GPU time: the launch overhead is the same
    return (
        ms if ms is not None else float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))
    )


def _sweep_one(d: int, n: int, heads: int) -> list[dict]:
    from dataclasses import replace

    from prune.kernels._attention_stats_triton import default_config

    q = torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, heads, n, d, device="cuda", dtype=torch.bfloat16)
    base = default_config(q, n, n, heads, 1, False)
    res = [{"mode": "all", "d": d, "n": n, "cfg": "default", "ms": _time_config(q, k, None)}]
    for bm, bn, w, st in _LSE_OPTS:
        cfg = replace(base, lse_block_m=bm, lse_block_n=bn, lse_warps=w, lse_stages=st)
        res.append(
            {
                "mode": "all",
                "d": d,
                "n": n,
                "vary": "lse",
                "cfg": [bm, bn, w, st],
                "ms": _time_config(q, k, cfg),
            }
        )
    for bn, bm, w, st in _COL_OPTS:
        for acc2d in (False, True):
            cfg = replace(base, col_block_n=bn, col_block_m=bm, col_warps=w, col_stages=st, col_acc2d=acc2d)
            ms = _time_config(q, k, cfg)
            res.append(
                {"mode": "all", "d": d, "n": n, "vary": "col", "cfg": [bn, bm, w, st, acc2d], "ms": ms}
            )
    lse_best = sorted(
        (r for r in res if r.get("vary") == "lse" and not isinstance(r["ms"], str)), key=lambda r: r["ms"]
    )
    col_best = sorted(
        (r for r in res if r.get("vary") == "col" and not isinstance(r["ms"], str)), key=lambda r: r["ms"]
    )
    for lr in lse_best[:2]:
        for cr in col_best[:3]:
            bm, bn, w, st = lr["cfg"]
            cbn, cbm, cw, cst, acc2d = cr["cfg"]
            cfg = replace(
                base,
                lse_block_m=bm, lse_block_n=bn, lse_warps=w, lse_stages=st,
                col_block_n=cbn, col_block_m=cbm, col_warps=cw, col_stages=cst, col_acc2d=acc2d,
            )  # fmt: skip
            ms = _time_config(q, k, cfg)
            res.append(
                {"mode": "all", "d": d, "n": n, "vary": "both", "cfg": [lr["cfg"], cr["cfg"]], "ms": ms}
            )
    for nq in (1, 32):
        qi = (torch.arange(nq) * (n // nq)).tolist()
        sub = default_config(q, n, nq, heads, 1, True)
        mode = f"q{nq}"
        res.append({"mode": mode, "d": d, "n": n, "cfg": "default", "ms": _time_config(q, k, None, qi)})
        for ks in (1, 4, 16):
            for kv in (1, 4, 16):
                for cbn in (64, 128):
                    cfg = replace(sub, key_splits=ks, kv_per_prog=kv, col_block_n=cbn)
                    res.append(
                        {
                            "mode": mode,
                            "d": d,
                            "n": n,
                            "cfg": [ks, kv, cbn],
                            "ms": _time_config(q, k, cfg, qi),
                        }
                    )
    for mode in ("all", "q1", "q32"):
        timed = [
            (r["ms"], r.get("vary", ""), r["cfg"])
            for r in res
            if r["mode"] == mode and not isinstance(r["ms"], str)
        ]
        print(f"sweep d={d} n={n} {mode}: best {sorted(timed, key=lambda x: x[0])[:4]}", flush=True)
        print(
            f"  default {[r['ms'] for r in res if r['mode'] == mode and r['cfg'] == 'default']}", flush=True
        )
    return res


def sweep(dims=(64, 80), ns=(4096, 16384), heads=16) -> list[dict]:
    """Time launch configurations of the all-rows and subset modes (for tuning the heuristics)."""
    results = []
    for d in dims:
        for n in ns:
            results += _sweep_one(d, n, heads)
            _cleanup()
    return results


def _gpu_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(report: dict) -> str:
    lines = [
        f"# Kernel benchmark on {report['gpu']}",
        "",
        f"torch {report['torch']}, triton {report['triton']}, {report['date']}. bf16, B=1, H=16. "
        "Eager times: median of CUDA-event-timed calls (`triton.testing.do_bench`, L2 flushed between "
        "calls), Python and launch overhead included. GPU times: the same through a CUDA-graph replay "
        "(launch overhead hidden). Peak = allocator peak above the inputs. stats = "
        "`prune.kernels.attention_stats`; mat = materialized softmax(QK^T) reduced in torch (for the "
        "subsets: on the chosen rows only); SDPA = `F.scaled_dot_product_attention` forward (q, k, v of "
        "one shape).",
        "",
        "## attention_stats, all query rows",
        "",
        "| d | N | stats ms | SDPA ms | stats / SDPA | stats GPU ms | SDPA GPU ms | GPU ratio | mat ms | "
        "mat / stats | stats peak MB | SDPA peak MB | mat peak MB | rel. err vs mat |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["attention"]:
        g = r.get("graph_ms", {})
        lines.append(
            f"| {r['d']} | {r['n']} | {_fmt(r['stats_all']['ms'])} | {_fmt(r['sdpa']['ms'])} | "
            f"{_fmt(r['stats_over_sdpa'], '.2f')} | {_fmt(g.get('stats_all'))} | {_fmt(g.get('sdpa'))} | "
            f"{_fmt(r.get('graph_stats_over_sdpa'), '.2f')} | {_fmt(r['mat_all']['ms'])} | "
            f"{_fmt(r['mat_over_stats'], '.1f')} | {_fmt(r['stats_all']['peak_mb'], '.1f')} | "
            f"{_fmt(r['sdpa']['peak_mb'], '.1f')} | {_fmt(r['mat_all']['peak_mb'], '.1f')} | "
            f"{_fmt(r.get('rel_err_all'), '.1e')} |"
        )
    lines += [
        "",
        "## attention_stats, query subsets (CLS row; 32 rows)",
        "",
        "| d | N | CLS ms | CLS mat ms | CLS / SDPA | CLS GPU ms | 32 rows ms | 32 rows mat ms | "
        "32 rows / SDPA | 32 rows GPU ms | 32 rows GPU / SDPA GPU | rel. err (32 rows) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["attention"]:
        g = r.get("graph_ms", {})
        lines.append(
            f"| {r['d']} | {r['n']} | {_fmt(r['stats_cls']['ms'])} | {_fmt(r['mat_cls']['ms'])} | "
            f"{_pct(r['cls_over_sdpa'])} | {_fmt(g.get('stats_cls'))} | {_fmt(r['stats_q32']['ms'])} | "
            f"{_fmt(r['mat_q32']['ms'])} | {_pct(r['q32_over_sdpa'])} | {_fmt(g.get('stats_q32'))} | "
            f"{_pct(r.get('graph_q32_over_sdpa'))} | {_fmt(r.get('rel_err_q32'), '.1e')} |"
        )
    if report.get("other"):
        lines += [
            "",
            "## topk_gather and transition_variation (bf16)",
            "",
            "| op | shape (B, N, D) | k | Triton ms | reference ms |",
            "|---|---|---|---|---|",
        ]
        for r in report["other"]:
            lines.append(
                f"| {r['op']} | {tuple(r['shape'])} | {r.get('k', '-')} | {_fmt(r['triton']['ms'])} | "
                f"{_fmt(r['reference']['ms'])} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmarks/results", help="output folder (default benchmarks/results)")
    p.add_argument("--ns", default="577,2304,4096,16384,32768", help="sequence lengths")
    p.add_argument("--dims", default="64,80", help="head dims")
    p.add_argument("--sweep", action="store_true", help="also time launch configurations (tuning)")
    p.add_argument("--no-other", action="store_true", help="skip topk_gather / transition_variation")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    dims = [int(x) for x in args.dims.split(",") if x]
    ns = [int(x) for x in args.ns.split(",") if x]
    gpu = torch.cuda.get_device_name()
    report = {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dtype": "bfloat16",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = _gpu_slug(gpu)
    if args.sweep:
        report["sweep"] = sweep()
        (out / f"sweep_{slug}.json").write_text(json.dumps(report["sweep"], indent=1))
    report["attention"] = bench_attention(dims, ns)
    if not args.no_other:
        report["other"] = bench_other()
    table = markdown(report)
    (out / f"kernels_{slug}.json").write_text(
        json.dumps({k: v for k, v in report.items() if k != "sweep"}, indent=1)
    )
    (out / f"kernels_{slug}.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
