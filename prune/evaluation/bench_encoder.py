"""`prune bench-encoder`: the vision encoder with transformers' attention path vs one segmented call.

Qwen-family encoders attend inside windows / images / frames; with SDPA or eager transformers runs one
attention call per segment (~80 windows x 28 blocks per 1344 px image on Qwen2.5-VL-7B), which makes
the encoder launch-bound. ``vision_attention="segmented"`` (``prune.wrap``) runs each layer as one
FlexAttention call over all segments. This benchmark measures, on one model (a shipped shape with
random weights: speed does not depend on the values), for an image and a video:

- ``encoder``: ``get_image_features`` / ``get_video_features`` (vision encoder + merger) with the
  model's own attention (``default``) and with the segmented one installed on the encoder's
  attention modules (``segmented``);
- ``encoder (tapped)``: the same, on the model wrapped with ``method`` at the pruned keep (post-encoder):
  what the statistics taps add to the encoder (HiPrune on Qwen2.5-VL-7B: blocks 15 and 31);
- ``prefill``: one forward of the wrapped model over the prompt (vision encoder + pruning + language
  model) at keep 1.0 and with ``method`` at each pruned keep, at each of ``stages`` (post-encoder:
  the whole encoder runs; encoder: rows drop inside it), each with ``vision_attention`` default and
  segmented, at each of ``batches`` (copies of the prompt);
- ``ttft``: ``generate(max_new_tokens=1)`` of the same configurations (prefill + first token);
- ``max_abs_diff``: the largest difference between the encoder outputs of the two paths (and the
  largest output magnitude beside it, for scale).

``compile``: the language model of every prefill / ttft row (pruned and unpruned) runs under
``torch.compile(mode="reduce-overhead")`` on a static cache per input (reset per call), as
``prune bench --compile`` does; ``inputs`` picks the media (image and / or video).

Every pruned prefill / ttft row carries ``vs_unpruned`` (the unpruned row of the same attention and
batch over it) and ``vs_default`` (the unpruned row with transformers' default attention over it).

Round-robin as MEASURING.md asks: every row once per round, the order rotating, ``rounds`` rounds
after ``warmup`` rounds (bench.py's loop); per row min / median / spread of the GPU time (CUDA
events) and the host time to return before synchronising. The first segmented call compiles
FlexAttention (tens of seconds; a second sequence length recompiles once): the warm-up rounds take it.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prune

from ..hooks import adapter_for
from ..hooks import vision_compile as VC  # noqa: N812
from ..hooks import vision_graphs as VG  # noqa: N812
from . import models as M
from .bench import (
    _CacheMaker,
    _Clock,
    _compile_language_model,
    _compile_limits,
    _device_name,
    _reset_rope_deltas,
    _round_robin,
    _Samples,
    _slug,
    unwrapped_vision,
    write_files,
)

SCHEMA = "prune.bench_encoder/1"
#: vision attention of a row: transformers' default, segmented, segmented + CUDA graphs of the layers,
#: segmented + compiled layers (vision_compile), segmented + compiled layers replayed as CUDA graphs
MODES = ("default", "segmented", "graphs", "compiled", "compiled_graphs")
_CUDA_MODES = ("graphs", "compiled_graphs")  # CUDA graphs
_DIFF_MODES = ("graphs", "compiled", "compiled_graphs")


def _graphed(mode: str) -> bool:
    return mode in ("graphs", "compiled_graphs")


def _compiled(mode: str) -> bool:
    return mode in ("compiled", "compiled_graphs")


def _wrap_options(mode: str) -> dict[str, Any]:
    """``prune.wrap`` arguments of a row's mode."""
    if mode == "default":
        return {"vision_attention": "default"}
    return {"vision_attention": "segmented", "vision_graphs": _graphed(mode), "vision_compile": _compiled(mode)}


@dataclass
class EncoderBenchSettings:
    image_size: int = 1344  # square image; the processor resizes it to its pixel budget
    frames: int = 32
    frame_size: int = 448
    prompt_tokens: int = 64
    warmup: int = 2
    rounds: int = 10
    dtype: str = "bfloat16"
    attn: str = "sdpa"
    device: str = "cuda"
    seed: int = 0
    prefill: bool = True
    prefill_keeps: tuple[float, ...] = (1.0, 0.11)
    method: str = "hiprune"
    stages: tuple[str, ...] = ("post_encoder", "encoder")
    batches: tuple[int, ...] = (1,)
    modes: tuple[str, ...] = MODES
    ttft: bool = True
    tap: bool = True
    #: the inputs of the rows: "image" and / or "video"
    inputs: tuple[str, ...] = ("image", "video")
    #: the language model under torch.compile(mode="reduce-overhead") with a static cache, every
    #: prefill / ttft row (pruned and unpruned alike; CUDA only)
    compile: bool = False


def _modality_inputs(inputs: dict[str, torch.Tensor], modality: str) -> dict[str, torch.Tensor]:
    keys = ("pixel_values", "image_grid_thw") if modality == "image" else ("pixel_values_videos", "video_grid_thw")
    return {k: inputs[k] for k in keys if k in inputs}


class _EncoderRow:
    """The encoder (feature function) of one modality, with one attention mode; with ``tapped``
    (method, keep), on the model wrapped with that method (its statistics taps on)."""

    kind = "encoder"

    def __init__(self, model: nn.Module, modality: str, mode: str, inputs: dict, clock: _Clock,
                 tapped: tuple[str, float] | None = None) -> None:
        self.model, self.modality, self.mode, self.clock = model, modality, mode, clock
        self.adapter = adapter_for(model)
        self.pixels = _modality_inputs(inputs, modality)
        self.tapped = tapped
        self.samples = _Samples()
        self.row: dict[str, Any] = {"kind": self.kind, "input": modality, "attention": mode, "status": "ok",
                                    "batch": int(inputs["input_ids"].shape[0])}
        if tapped is not None:
            self.row["tapped"] = f"{tapped[0]} @ {tapped[1]}"
        self._removers: list = []
        # the bench's one owner of each: every row replays / reuses what any row captured / compiled
        self.graphs: VG.VisionGraphs | None = None
        self.compiled: VC.VisionCompile | None = None

    def enter(self) -> None:
        if self.tapped is not None:
            self.wrap(self.tapped[0], self.tapped[1])
        elif self.mode != "default":  # segmented (every model here has segments), compiled, graphed
            self._removers = unwrapped_vision(self.adapter, self.graphs, self.compiled)

    def wrap(self, method: str, keep: float, **options: Any) -> None:
        prune.wrap(self.model, method, keep=keep, **_wrap_options(self.mode), **options)
        if _compiled(self.mode):
            VC.share(self.model, self.compiled)
        if _graphed(self.mode):
            VG.share(self.model, self.graphs)

    def exit(self) -> None:
        for remove in reversed(self._removers):
            remove()
        self._removers = []
        if self.tapped is not None and getattr(self.model, "prune_state", None) is not None:
            prune.unwrap(self.model)

    def run(self):
        # looked up per call: a wrapped model's feature function is prune's instance override
        return getattr(self.adapter.multimodal_module(), f"get_{self.modality}_features")(**self.pixels)

    def measure(self, samples: _Samples) -> None:
        ms, host, _ = self.clock(self.run)
        samples.add("ms", ms)
        samples.add("host_ms", host)


class _PrefillRow(_EncoderRow):
    """One forward of the wrapped model (``method`` at ``keep``, at ``stage``) with one
    ``vision_attention``."""

    kind = "prefill"

    def __init__(self, model, modality, mode, inputs, clock, method: str, keep: float,
                 stage: str | None = None) -> None:
        super().__init__(model, modality, mode, inputs, clock)
        self.method, self.keep, self.stage = method, keep, stage
        text = {k: inputs[k] for k in inputs if k not in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                           "video_grid_thw")}
        self.inputs = {**text, **self.pixels}
        self.row.update(method=method, keep=keep, stage=stage)
        #: compiled: the static cache of this input (one per input and batch, shared by its rows)
        self.cache: _CacheMaker | None = None

    def cache_kwargs(self) -> dict[str, Any]:
        return self.cache.kwargs(self.model) if self.cache is not None else {}

    def enter(self) -> None:
        self.wrap(self.method, self.keep, **({"stage": self.stage} if self.stage == "encoder" else {}))

    def exit(self) -> None:
        if getattr(self.model, "prune_state", None) is not None:
            prune.unwrap(self.model)

    def run(self):
        cache = self.cache_kwargs()
        _reset_rope_deltas(self.model)
        return self.model(**self.inputs, **cache, use_cache=True, logits_to_keep=1)


class _TTFTRow(_PrefillRow):
    """``generate`` of one new token: the prefill plus the first token's selection."""

    kind = "ttft"

    def run(self):
        cache = self.cache_kwargs()
        if cache:  # the language model is compiled already: generate must not compile it again
            cache["disable_compile"] = True
        _reset_rope_deltas(self.model)
        pad = getattr(self.model.generation_config, "pad_token_id", None)
        return self.model.generate(**self.inputs, max_new_tokens=1, do_sample=False, pad_token_id=pad, **cache)


def _encoder_output(out) -> torch.Tensor:
    """The features of a feature function's return (a tensor, a tuple / list of per-item tensors, or
    a model output whose first field holds them)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "pooler_output") and out.pooler_output is not None:
        out = out.pooler_output
    elif hasattr(out, "to_tuple"):
        out = out.to_tuple()[0]
    if isinstance(out, (list, tuple)):
        return torch.cat([o.reshape(-1, o.shape[-1]) for o in out])
    return out


def _differences(rows: list[_EncoderRow]) -> dict[str, dict[str, float]]:
    """Per modality: max |segmented - default| of the encoder outputs (and, for the graphs / compiled
    rows, max |mode - default| and |mode - segmented|) and max |default| (batch 1)."""
    out = {}
    by = {(r.modality, r.mode): r for r in rows if r.kind == "encoder" and r.tapped is None}
    for modality in ("image", "video"):
        if (modality, "default") not in by:
            continue
        with torch.no_grad():
            outputs = {}
            for mode in MODES:
                row = by.get((modality, mode))
                if row is None:
                    continue
                row.enter()
                try:
                    outputs[mode] = _encoder_output(row.run()).float()
                finally:
                    row.exit()
        ref = outputs["default"]
        out[modality] = {"max_abs": float(ref.abs().max()), "rows": int(ref.shape[0])}
        if "segmented" in outputs:
            out[modality]["max_abs_diff"] = float((outputs["segmented"] - ref).abs().max())
        for mode in _DIFF_MODES:
            if mode in outputs:
                out[modality][f"{mode}_max_abs_diff"] = float((outputs[mode] - ref).abs().max())
                if "segmented" in outputs:
                    out[modality][f"{mode}_vs_segmented"] = float((outputs[mode] - outputs["segmented"]).abs().max())
    return out


def _summary(row: _EncoderRow) -> dict[str, Any]:
    s = row.samples
    return {
        **row.row,
        "ms": s.low("ms"),
        "median_ms": s.median("ms"),
        "spread": s.spread("ms"),
        "host_ms": s.low("host_ms"),
        "rounds": len(s.values.get("ms", [])),
    }


def _speedups(rows: list[dict[str, Any]]) -> None:
    """``speedup`` of each segmented row over its default twin (by min and by median); for pruned
    prefill / ttft rows ``vs_unpruned`` (the unpruned row of the same attention) and ``vs_default``
    (the unpruned row under the default attention); for tapped encoder rows ``tap_overhead``."""
    key = lambda r: (r["kind"], r["input"], r["batch"], r.get("method"), r.get("keep"), r.get("stage"),  # noqa: E731
                     r.get("tapped"))
    default = {key(r): r for r in rows if r["attention"] == "default"}
    unpruned = {(r["kind"], r["input"], r["batch"], r["attention"]): r for r in rows
                if r["kind"] in ("prefill", "ttft") and r.get("keep") == 1.0}
    untapped = {(r["input"], r["batch"], r["attention"]): r for r in rows
                if r["kind"] == "encoder" and not r.get("tapped")}
    ratio = lambda a, b: a["ms"] / b["ms"] if a and b and a.get("ms") and b.get("ms") else None  # noqa: E731
    for r in rows:
        base = default.get(key(r))
        if r["attention"] != "default" and base and r["ms"] and base["ms"]:
            r["speedup"] = base["ms"] / r["ms"]
            r["median_speedup"] = base["median_ms"] / r["median_ms"] if r["median_ms"] else None
        if r["kind"] in ("prefill", "ttft") and r.get("keep") != 1.0:
            r["vs_unpruned"] = ratio(unpruned.get((r["kind"], r["input"], r["batch"], r["attention"])), r)
            r["vs_default"] = ratio(unpruned.get((r["kind"], r["input"], r["batch"], "default")), r)
        if r["kind"] == "encoder" and r.get("tapped"):
            plain = ratio(r, untapped.get((r["input"], r["batch"], r["attention"])))
            r["tap_overhead"] = plain - 1.0 if plain is not None else None


def run_encoder_bench(
    spec: M.ModelSpec,
    settings: EncoderBenchSettings,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the model, measure every row round-robin; returns the JSON dict."""
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise M.ModelSpecError("--device cuda but torch sees no CUDA device (use --device cpu)")
    if settings.compile and device.type != "cuda":
        raise M.ModelSpecError("--compile times CUDA graphs: it needs --device cuda")
    if settings.compile and settings.warmup < 1:
        raise M.ModelSpecError("--compile needs --warmup of at least 1 (the first round compiles)")
    bad = [m for m in settings.inputs if m not in ("image", "video")]
    if bad or not settings.inputs:
        raise M.ModelSpecError(f"inputs: {bad or 'none'}: choose from image, video")
    dtype = M.DTYPES[settings.dtype]
    model = M.build_model(spec, device=device, dtype=dtype, attn_implementation=settings.attn, seed=settings.seed)
    adapter = adapter_for(model)
    if not adapter.segmented_vision:
        raise M.ModelSpecError(f"{spec.name}: its vision encoder has no segments (a Qwen-family model is needed)")
    from .tasks.shapes import random_scene, render_scene

    image = render_scene(random_scene(settings.seed), size=(settings.image_size, settings.image_size))
    frames = [render_scene(random_scene(settings.seed + 1 + i), size=(settings.frame_size, settings.frame_size))
              for i in range(settings.frames)]
    processor = M.build_image_processor(spec)
    inputs: dict[tuple[str, int], dict] = {}
    for batch in settings.batches:
        inputs["image", batch] = M.make_inputs(model, processor, [image] * batch, prompt_tokens=settings.prompt_tokens,
                                               seed=settings.seed, device=device, dtype=dtype, spec=spec)
        inputs["video", batch] = M.make_video_inputs(model, spec, frames, prompt_tokens=settings.prompt_tokens,
                                                     seed=settings.seed, device=device, dtype=dtype, copies=batch)
    first = settings.batches[0]
    grids = {"image": inputs["image", first]["image_grid_thw"].tolist()[:1],
             "video": inputs["video", first]["video_grid_thw"].tolist()[:1]}
    clock = _Clock(device)
    pruned = [k for k in settings.prefill_keeps if k != 1.0]
    modes = [m for m in MODES if m in settings.modes]
    if device.type != "cuda" and any(m in _CUDA_MODES for m in modes):
        log(f"(no {', '.join(m for m in modes if m in _CUDA_MODES)} rows: they need --device cuda)")
        modes = [m for m in modes if m not in _CUDA_MODES]
    media = [m for m in ("image", "video") if m in settings.inputs]
    rows: list[_EncoderRow] = [
        _EncoderRow(model, modality, mode, inputs[modality, first], clock) for modality in media
        for mode in modes
    ]
    if settings.tap and pruned:
        rows += [_EncoderRow(model, modality, mode, inputs[modality, first], clock, tapped=(settings.method, pruned[0]))
                 for modality in media for mode in modes]
    if settings.prefill:
        kinds = (_PrefillRow, _TTFTRow) if settings.ttft else (_PrefillRow,)
        for kind in kinds:
            for batch in settings.batches:
                for modality in media:
                    for keep in settings.prefill_keeps:
                        for stage in ((None,) if keep == 1.0 else settings.stages):
                            rows += [kind(model, modality, mode, inputs[modality, batch], clock, settings.method, keep,
                                          stage) for mode in modes]
    # one owner per mode: every row of a mode replays what any of its rows captured (graphs of the
    # eager and of the compiled layers are different graphs of the same keys), and one compiled
    # function serves every compiled row
    graphs = {mode: VG.VisionGraphs(max_shapes=64) for mode in modes if _graphed(mode)}
    compiled = VC.VisionCompile() if any(_compiled(m) for m in modes) else None
    caches = {key: _CacheMaker(True, value, 1) for key, value in inputs.items()} if settings.compile else {}
    for row in rows:
        row.graphs = graphs.get(row.mode)
        row.compiled = compiled if _compiled(row.mode) else None
        if isinstance(row, _PrefillRow):
            row.cache = caches.get((row.modality, row.row["batch"]))
    if settings.compile:
        _compile_language_model(model)  # vision-side pruning: the pruned prefill is one graph per length
    log(
        f"{spec.name}: {type(model).__name__} ({settings.dtype}, {settings.attn}) on {_device_name(device)}; "
        f"image grid {grids['image']}, video grid {grids['video']}; {len(rows)} rows, {settings.rounds} rounds "
        f"after {settings.warmup} warm-up rounds"
    )
    with torch.no_grad(), _compile_limits(settings):
        _round_robin(rows, settings, progress, log)  # reads warmup and rounds
    differences = _differences(rows)
    summaries = [_summary(r) for r in rows]
    _speedups(summaries)
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": spec.name, "architecture": type(model).__name__, "source": "shape (random weights)"
                  if not spec.pretrained else str(spec.path)},
        "environment": {
            "device": _device_name(device),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "prune": prune.__version__,
        },
        "settings": {**asdict(settings), "prefill_keeps": list(settings.prefill_keeps),
                     "stages": list(settings.stages), "batches": list(settings.batches),
                     "inputs": list(settings.inputs)},
        "grids": grids,
        "vision_tokens": {k: int(sum(t * h * w for t, h, w in g) // adapter.merge_size() ** 2) for k, g in grids.items()},
        "max_abs_diff": differences,
        "rows": summaries,
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    env, s = result["environment"], result["settings"]
    lines = [
        f"### {result['model']['name']}: vision encoder, default vs segmented attention; encoder-stage pruning",
        "",
        f"{env['device']}, torch {env['torch']}, transformers {env['transformers']}; {s['dtype']}, {s['attn']}; "
        f"image {s['image_size']} px (grid {result['grids']['image']}), video {s['frames']} x {s['frame_size']} px "
        f"(grid {result['grids']['video']}); {s['rounds']} rounds after {s['warmup']} warm-up, round-robin"
        + ("; language model compiled (reduce-overhead, static cache) in every prefill / ttft row" if s.get("compile")
           else ""),
        "",
        "| row | input | batch | method @ keep | stage | attention | min ms | median ms | spread | host ms | "
        "speedup over default (min / median) | vs unpruned, same attention | vs unpruned, default attention |",
        "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    times = lambda v: "-" if v is None else f"{v:.2f}x"  # noqa: E731
    for r in result["rows"]:
        what = f"{r['method']} @ {r['keep']}" if r["kind"] != "encoder" else "-"
        kind = r["kind"]
        if r.get("tapped"):
            kind = "encoder, tapped"
            what = f"{r['tapped']} (taps +{100 * r['tap_overhead']:.1f} %)" if r.get("tap_overhead") is not None \
                else r["tapped"]
        speed = "-"
        if r.get("speedup"):
            speed = f"{r['speedup']:.2f}x / {_fmt(r.get('median_speedup'), 2)}x"
        spread = "-" if r["spread"] is None else f"{100 * r['spread']:.0f} %"
        lines.append(
            f"| {kind} | {r['input']} | {r.get('batch', 1)} | {what} | {r.get('stage') or '-'} | {r['attention']} | "
            f"{_fmt(r['ms'])} | {_fmt(r['median_ms'])} | {spread} | {_fmt(r['host_ms'])} | {speed} | "
            f"{times(r.get('vs_unpruned'))} | {times(r.get('vs_default'))} |"
        )
    lines.append("")
    for modality, d in result["max_abs_diff"].items():
        if d.get("max_abs_diff") is not None:
            lines.append(
                f"- {modality}: encoder outputs ({d['rows']} rows), segmented vs default, differ by at most "
                f"{d['max_abs_diff']:.3g} (largest output magnitude {d['max_abs']:.3g})"
            )
        for mode in _DIFF_MODES:
            if d.get(f"{mode}_max_abs_diff") is not None:
                lines.append(
                    f"- {modality}: {mode} vs default {d[f'{mode}_max_abs_diff']:.3g}"
                    + (f", {mode} vs segmented {d[f'{mode}_vs_segmented']:.3g}" if f"{mode}_vs_segmented" in d else "")
                )
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Bars: min ms of every row, default and segmented side by side."""
    from . import plots

    fig, axes = plots.figure(1, width=max(7.0, 0.45 * len({(r["kind"], r["input"], r.get("batch"), r.get("keep"),
                                                                 r.get("stage"), r.get("tapped")) for r in result["rows"]})))
    ax = axes[0] if isinstance(axes, (list, tuple)) else axes
    groups: dict[str, dict[str, float]] = {}
    for r in result["rows"]:
        label = f"{r['kind']} {r['input']}"
        if r["kind"] != "encoder":
            label += f" b{r.get('batch', 1)}\n{r['method']}@{r['keep']}" + (f"\n{r['stage']}" if r.get("stage") else "")
        elif r.get("tapped"):
            label += "\ntapped"
        groups.setdefault(label, {})[r["attention"]] = r["ms"] or 0.0
    labels = list(groups)
    modes = [m for m in MODES if any(m in g for g in groups.values())]
    width = 0.8 / max(1, len(modes))
    for i, mode in enumerate(modes):
        xs = [j + (i - (len(modes) - 1) / 2) * width for j in range(len(labels))]
        ax.bar(xs, [groups[lab].get(mode, 0.0) for lab in labels], width, label=mode)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (min over rounds, log scale)")
    ax.legend()
    ax.set_title(f"{result['model']['name']} on {result['environment']['device']}", fontsize=9)
    return plots.save(fig, path)


def write_outputs(result: dict[str, Any], out_dir: str | Path, *, log: Callable[[str], None] = print
                  ) -> dict[str, Path]:
    """``bench_encoder_<model>_<device>.{json,md,png}`` in ``out_dir`` (no PNG without matplotlib)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_encoder_{_slug(result['model']['name'])}_{_slug(result['environment']['device'])}"
    if result["settings"].get("compile"):
        stem += "_compiled"
    return write_files(result, out_dir, stem, markdown, plot, log)


def main(argv: list[str] | None = None) -> int:
    """``python -m prune.evaluation.bench_encoder``: the same as ``prune bench-encoder``."""
    from ..cli import main as cli_main

    return cli_main(["bench-encoder", *(argv if argv is not None else __import__("sys").argv[1:])])


if __name__ == "__main__":
    raise SystemExit(main())
