"""`prune eval`: lmms-eval sweeps over methods x keep on one loaded model, with an accuracy table and
an accuracy-vs-keep plot.

The base lmms-eval model is built once (through the ``pruned`` plugin); every point re-wraps the same
Hugging Face model and calls ``lmms_eval.evaluator.simple_evaluate`` in process. ``keep`` 1.0 is
evaluated once, unpruned (by prune's identity contract a method at keep 1.0 gives the same outputs).
One process: for data parallelism run ``accelerate launch -m lmms_eval --model pruned ...`` per point
and merge the output folders with ``prune report``.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._format import fmt as _fmt

SCHEMA = "prune.eval/1"
ROW_FIELDS = (
    "method",
    "keep",
    "task",
    "metric",
    "value",
    "stderr",
    "samples",
    "vision_tokens_before",
    "vision_tokens_after",
    "keep_ratio",
    "prefill_ms",
)
BASES = {  # transformers architecture -> lmms-eval model that loads it
    "LlavaForConditionalGeneration": "llava_hf",
    "LlavaNextForConditionalGeneration": "llava_hf",
    "LlavaOnevisionForConditionalGeneration": "llava_hf",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen2_5OmniForConditionalGeneration": "qwen2_5_omni",
}
INSTALL_HINT = "prune eval needs lmms-eval: pip install 'vlm-prune[eval]'"


class EvalError(ValueError):
    """Bad input to prune eval (the CLI turns it into exit code 2)."""


def lmms_eval_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lmms_eval") is not None


def guess_base(model_dir: Path) -> str:
    config = json.loads((model_dir / "config.json").read_text())
    for arch in config.get("architectures") or []:
        if arch in BASES:
            return BASES[arch]
    raise EvalError(f"cannot tell which lmms-eval model loads {model_dir}; pass --base (e.g. llava_hf)")


def task_manager(include: Sequence[str] = ()):
    from lmms_eval.tasks import TaskManager

    from .tasks import TASKS_DIR

    return TaskManager("WARNING", include_path=[str(TASKS_DIR), *include])


def check_tasks(manager, tasks: Sequence[str]) -> None:
    known = set(manager.all_tasks)
    missing = [t for t in tasks if t not in known]
    if missing:
        import difflib

        hints = {t: difflib.get_close_matches(t, known, n=3) for t in missing}
        detail = "; ".join(
            f"{t!r} (did you mean {', '.join(h)}?)" if h else repr(t) for t, h in hints.items()
        )
        raise EvalError(f"unknown lmms-eval task(s): {detail}")


def metrics_of(task_result: dict[str, Any]) -> dict[str, tuple[float, float | None]]:
    """metric -> (value, stderr) from one task's entry of lmms-eval's ``results``."""
    out = {}
    for key, value in task_result.items():
        if (
            "," not in key
            or "_stderr" in key
            or not isinstance(value, (int, float))
            or isinstance(value, bool)
        ):
            continue
        metric, filt = key.split(",", 1)
        stderr = task_result.get(f"{metric}_stderr,{filt}")
        out[metric] = (float(value), float(stderr) if isinstance(stderr, (int, float)) else None)
    return out


def method_label(method: str, options: dict[str, Any] | None) -> str:
    """``fastv`` or, with options, ``fastv (layer=1)``: the name rows, tables and plot lines use."""
    if not options:
        return method
    return f"{method} (" + ", ".join(f"{k}={v}" for k, v in sorted(options.items())) + ")"


def rows_from_results(
    results: dict[str, Any], method: str, keep: float | int, stats: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """Table rows of one lmms-eval result (``stats``: the plugin's prune_* numbers, if any)."""
    stats = stats or {}
    n_samples = results.get("n-samples", {})
    rows = []
    for task, entry in sorted(results.get("results", {}).items()):
        for metric, (value, stderr) in sorted(metrics_of(entry).items()):
            rows.append(
                {
                    "method": method,
                    "keep": keep,
                    "task": task,
                    "metric": metric,
                    "value": value,
                    "stderr": stderr,
                    "samples": (n_samples.get(task) or {}).get("effective"),
                    "vision_tokens_before": stats.get("prune_vision_tokens_before"),
                    "vision_tokens_after": stats.get("prune_vision_tokens_after"),
                    "keep_ratio": stats.get("prune_keep_ratio"),
                    "prefill_ms": stats.get("prune_prefill_ms"),
                }
            )
    return rows


def parse_lmms_results(path: Path) -> dict[str, Any] | None:
    """A prune.eval-style dict from an lmms-eval ``*_results.json`` of ``--model pruned`` (else None)."""
    data = json.loads(path.read_text())
    config = data.get("config") or {}
    args = config.get("model_args") or ""
    if config.get("model") != "pruned" or not isinstance(args, str):
        return None
    pairs = dict(p.split("=", 1) for p in re.split(r",(?![^{]*})", args) if "=" in p)
    method = pairs.get("method", "hiprune")
    keep_text = pairs.get("keep", "0.33")
    keep: float | int = float(keep_text) if any(c in keep_text for c in ".e") else int(keep_text)
    stats = {
        k.removeprefix("avg_"): v
        for k, v in (data.get("throughput") or {}).items()
        if k.startswith("avg_prune_")
    }
    return {
        "schema": SCHEMA,
        "created": data.get("date"),
        "model": {"path": pairs.get("pretrained"), "base": pairs.get("base")},
        "settings": {"limit": config.get("limit"), "source": str(path)},
        "rows": rows_from_results(data, method, keep, stats),
    }


def run_eval(
    model_dir: Path,
    tasks: Sequence[str],
    methods: Sequence[str],
    keeps: Sequence[float | int],
    *,
    base: str | None = None,
    limit: int | None = None,
    device: str = "cpu",
    dtype: str = "auto",
    batch_size: int = 1,
    model_args: dict[str, Any] | None = None,
    include: Sequence[str] = (),
    raw_dir: Path | None = None,
    partial: Path | None = None,
    options: dict[str, dict[str, Any]] | None = None,
    stages: Sequence[str] | None = None,
    unpruned: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Evaluate the unpruned model and every method x keep (< 1) on ``tasks``; returns the JSON dict.
    ``partial``: a file rewritten with the finished points after each one (a long sweep that is
    stopped keeps them; :func:`load_result` reads it). ``options``: method -> its options (e.g.
    ``{"fastv": {"layer": 1}}``); such a method's rows are labelled ``fastv (layer=1)``. ``stages``:
    each method with a ``stage`` option runs once per stage ("post_encoder", "encoder"), its rows
    labelled with the stage. ``unpruned=False`` leaves out the unpruned point (a sweep split over
    several runs measures it once)."""
    from lmms_eval.evaluator import simple_evaluate
    from tqdm.auto import tqdm

    from prune.config import PruneConfig
    from prune.methods import get_method

    from .lmms_plugin import build

    base = base or guess_base(model_dir)
    manager = task_manager(include)
    check_tasks(manager, tasks)
    options = {m: dict(o) for m, o in (options or {}).items() if o}
    unused = sorted(set(options) - set(methods))
    if unused:
        raise EvalError(f"options given for method(s) not in the sweep: {', '.join(unused)}")
    plan: list[tuple[str, float | int, dict[str, Any]]] = [("none", 1.0, {})]
    for m in methods:
        staged = bool(stages) and "stage" in get_method(m).defaults
        variants = [{**options.get(m, {}), "stage": st} for st in stages] if staged else [options.get(m, {})]
        plan += [(m, k, o) for o in variants for k in keeps if not (isinstance(k, float) and k >= 1.0)]
    for method, keep, opts in plan[1:]:
        # bad names / keeps / options fail before the model loads
        PruneConfig(method=method, keep=keep, options=opts)
    if not unpruned:
        plan = plan[1:]
    args = {
        "base": base,
        "pretrained": str(model_dir),
        "method": "none",
        "dtype": dtype,
        "device": device,
        "batch_size": batch_size,
        **(model_args or {}),
    }
    if base == "llava_hf":
        args.setdefault("device_map", device)  # llava_hf's default device_map="" breaks on transformers 5
    lm = build(args)
    lm.prune_keep_model = True
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")

    def result() -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "created": created,
            "model": {"path": str(model_dir), "base": base},
            "settings": {
                "tasks": list(tasks),
                "limit": limit,
                "device": device,
                "dtype": dtype,
                "batch_size": batch_size,
                **({"stages": list(stages)} if stages else {}),
            },
            "rows": rows,
            "skipped": skipped,
        }

    bar = tqdm(plan, desc="eval", unit="point", disable=not progress)
    try:
        for method, keep, opts in bar:
            bar.set_postfix_str(f"{method_label(method, opts)} keep={keep}")
            try:
                lm.prune_rewrap(None if method == "none" else PruneConfig(method=method, keep=keep, options=opts))
            except ValueError as exc:  # a point this model cannot run (e.g. an in-LLM keep below its floor)
                skipped.append({"method": method, "keep": keep, "reason": str(exc)})
                log(f"skipped {method} keep={keep}: {exc}")
                continue
            results = simple_evaluate(
                model=lm,
                tasks=list(tasks),
                limit=limit,
                task_manager=manager,
                batch_size=batch_size,
                device=device,
                log_samples=False,
                verbosity="WARNING",
                bootstrap_iters=0,
            )
            if results is None:  # not rank 0
                continue
            rows += rows_from_results(results, method_label(method, opts), keep, lm.prune_summary)
            if partial is not None:
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(json.dumps(result(), indent=2) + "\n")
            if raw_dir is not None:
                raw_dir.mkdir(parents=True, exist_ok=True)
                name = f"{method}{'_encoder' if opts.get('stage') == 'encoder' else ''}_keep{keep}.json"
                (raw_dir / name).write_text(
                    json.dumps({k: v for k, v in results.items() if k != "samples"}, indent=2, default=str)
                )
    finally:
        lm.prune_keep_model = False
        lm.clean()
    return result()


# ---- outputs --------------------------------------------------------------------------------------


def markdown(results: Sequence[dict[str, Any]]) -> str:
    """One table: a row per (method, keep), a column per task/metric, then tokens and prefill ms."""
    rows = [r for res in results for r in res["rows"]]
    if not rows:
        return "_no evaluation results_\n"
    columns = sorted({(r["task"], r["metric"]) for r in rows})
    points: dict[tuple[str, Any], dict[str, Any]] = {}
    for r in rows:
        p = points.setdefault((r["method"], r["keep"]), {"row": r})
        p[(r["task"], r["metric"])] = r
    head = (
        "| method | keep | " + " | ".join(f"{t} {m}" for t, m in columns) + " | vision tokens | prefill ms |"
    )
    lines = [head, "|" + "---|" * (len(columns) + 4)]

    def order(key):
        method, keep = key
        return (method != "none", method, -float(keep))

    for key in sorted(points, key=order):
        p = points[key]
        first = p["row"]
        cells = []
        for col in columns:
            r = p.get(col)
            cells.append(
                "-" if r is None else _fmt(r["value"], 3) + (f" ± {_fmt(r['stderr'], 3)}" if r["stderr"] else "")
            )
        tokens = (
            f"{_fmt(first['vision_tokens_after'], 1)}/{_fmt(first['vision_tokens_before'], 1)}"
            if first["vision_tokens_before"] is not None
            else "-"
        )
        lines.append(
            f"| {key[0]} | {key[1]} | "
            + " | ".join(cells)
            + f" | {tokens} | {_fmt(first['prefill_ms'], 1)} |"
        )
    return "\n".join(lines) + "\n"


def plot(results: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy against the kept fraction, one panel per task/metric, one line per method."""
    from . import plots

    rows = [r for res in results for r in res["rows"]]
    columns = sorted({(r["task"], r["metric"]) for r in rows})
    if not columns:
        raise ValueError("no evaluation rows to plot")
    fig, axes = plots.figure(len(columns))
    for ax, (task, metric) in zip(axes, columns):
        series: dict[str, list[tuple[float, float]]] = {}
        baseline = None
        for r in rows:
            if (r["task"], r["metric"]) != (task, metric):
                continue
            if r["method"] == "none":
                baseline = r["value"]
                continue
            # the requested fraction: for in-LLM methods it is the average over layers, while the
            # measured keep_ratio counts what the last layer saw; a token count falls back to the ratio
            x = r["keep"] if isinstance(r["keep"], float) else r["keep_ratio"]
            if x is not None:
                series.setdefault(r["method"], []).append((x, r["value"]))
        if baseline is not None:  # every method at keep 1 is the unpruned model
            for points in series.values():
                points.append((1.0, baseline))
        plots.lines_vs_keep(ax, series, ylabel=metric, title=f"{task}: {metric} vs keep", baseline=baseline)
        values = [v for points in series.values() for _, v in points] + (
            [baseline] if baseline is not None else []
        )
        if values and all(0.0 <= v <= 1.0 for v in values):
            ax.set_ylim(-0.02, 1.02)
    return plots.save(fig, path)


def write_outputs(
    result: dict[str, Any], out_dir: Path, *, log: Callable[[str], None] = print
) -> dict[str, Path]:
    from .plots import PlotUnavailable

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "eval.json", "md": out_dir / "eval.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    m = result["model"]
    text = f"### accuracy: {m['path']} (lmms-eval model {m['base']})\n\n" + markdown([result])
    for skip in result.get("skipped") or []:
        text += f"\n- skipped {skip['method']} at keep {skip['keep']}: {skip['reason']}"
    if result.get("skipped"):
        text += "\n"
    try:
        paths["png"] = plot([result], out_dir / "accuracy_vs_keep.png")
        text += f"\n![accuracy vs keep]({paths['png'].name})\n"
    except PlotUnavailable as exc:
        log(f"note: {exc}; wrote JSON and markdown only")
    paths["md"].write_text(text)
    return paths


def load_result(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a prune eval result (schema {data.get('schema')!r})")
    return data
