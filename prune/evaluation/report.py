"""`prune report`: bench and eval outputs of one or more run folders merged into one markdown report
with its plots (copied next to it), so the report folder is self-contained.

It reads ``bench_*.json`` (prune bench), ``eval.json`` (prune eval) and lmms-eval ``*_results.json``
files written by ``python -m lmms_eval --model pruned`` (method and keep come from their model_args,
statistics from their ``throughput`` section), searching each folder recursively.
"""

from __future__ import annotations

import datetime as _dt
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

from . import bench, sweep


class ReportError(ValueError):
    """Nothing to report, or an unreadable input (the CLI turns it into exit code 2)."""


def collect(paths: Sequence[Path]) -> tuple[list[tuple[Path, dict]], list[tuple[Path, dict]]]:
    """(bench results, eval results), each with the file it came from, in a stable order."""
    files: list[Path] = []
    for path in paths:
        if not path.exists():
            raise ReportError(f"{path} does not exist")
        files += [path] if path.is_file() else sorted(p for p in path.rglob("*.json") if p.is_file())
    benches, evals = [], []
    for f in dict.fromkeys(files):
        try:
            data = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(data, dict):
            continue
        if data.get("schema") == bench.SCHEMA:
            benches.append((f, data))
        elif data.get("schema") == sweep.SCHEMA:
            evals.append((f, data))
        elif f.name.endswith("_results.json") and (parsed := sweep.parse_lmms_results(f)) is not None:
            evals.append((f, parsed))
    return benches, evals


def _copy(src: Path, out_dir: Path, used: set[str]) -> str:
    name = src.name
    i = 1
    while name in used:
        name = f"{src.stem}_{i}{src.suffix}"
        i += 1
    used.add(name)
    if src.resolve() != (out_dir / name).resolve():
        shutil.copyfile(src, out_dir / name)
    return name


def write_report(paths: Sequence[Path], out_dir: Path, *, log: Callable[[str], None] = print) -> Path:
    """Write ``out_dir/report.md`` (and its PNGs); returns its path."""
    from .plots import PlotUnavailable

    benches, evals = collect(paths)
    if not benches and not evals:
        raise ReportError(
            "no prune bench/eval results (bench_*.json, eval.json, lmms-eval *_results.json) under "
            + ", ".join(map(str, paths))
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    lines = [
        "# prune report",
        "",
        f"Generated {_dt.datetime.now(_dt.timezone.utc).isoformat(timespec='seconds')} from "
        f"{len(benches)} benchmark(s) and {len(evals)} evaluation(s):",
        "",
        *[f"- `{f}`" for f, _ in benches + evals],
        "",
    ]
    if benches:
        lines += ["## Speed", ""]
        for f, result in benches:
            text = bench.markdown(result)
            png = f.with_suffix(".png")
            if png.is_file():
                text += f"\n![{result['model']['name']}]({_copy(png, out_dir, used)})\n"
            lines += [text, ""]
    if evals:
        lines += ["## Accuracy", ""]
        results = [r for _, r in evals]
        models = sorted({f"{r['model'].get('path')} ({r['model'].get('base')})" for r in results})
        lines += [f"Models: {', '.join(models)}.", "", sweep.markdown(results)]
        try:
            name = "accuracy_vs_keep.png"
            used.add(name)
            sweep.plot(results, out_dir / name)
            lines += ["", f"![accuracy vs keep]({name})", ""]
        except PlotUnavailable as exc:
            log(f"note: {exc}; the report has no plots")
    path = out_dir / "report.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
