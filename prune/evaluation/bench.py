"""`prune bench`: what pruning saves at real scale, per method x keep.

For one model (a shipped shape with random weights built on the device, or a local pretrained
folder) and one batch of prompts with an image each, every row measures:

- ``vision_ms``: the image encoder and projector (``get_image_features``), with the method's signal
  collection when the model is wrapped;
- ``prefill_ms``: one forward over the prompt (vision encoder + pruning + language-model prefill);
- ``ttft_ms``: ``generate`` with one new token (prefill, first token, generate's own overhead);
- ``decode_tok_s``: tokens per second of the batch over the decoding steps (the ``new_tokens`` - 1
  steps after the first new token, timestamped inside one generate call);
- ``peak_mem_mb``: the allocator's peak during the decode-timing generate calls (CUDA only);
- ``kv_cache_mb`` / ``kv_tokens``: the cache the prefill leaves (bytes of all layers' keys and values);
- ``vision_gflops`` / ``prefill_gflops``: FLOPs counted by ``torch.utils.flop_counter`` (matmuls and
  attention of the model; prune's own statistics kernels are not counted);
- ``ideal_prefill_ms`` / ``ideal_decode_tok_s``: the unwrapped model on an input that simply has the
  kept number of tokens (its vision encoder, plus the language model on ``kv_tokens`` rows), so
  ``overhead_ms = prefill_ms - ideal_prefill_ms`` is what the pruning machinery costs.

Times are medians over ``repeats`` runs after ``warmup`` runs, CUDA events on a GPU
(``time.perf_counter`` on CPU). Rows of a method the model's family does not support, or that run
out of memory, keep their place with a ``status`` saying why.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prune

from .._compat import cache_length as _cache_length
from .._compat import find_cache
from . import models as M
from ._format import fmt as _fmt

SCHEMA = "prune.bench/1"
ROW_FIELDS = (
    "method",
    "keep",
    "status",
    "vision_tokens_before",
    "vision_tokens_after",
    "keep_ratio",
    "seq_len",
    "kv_tokens",
    "vision_ms",
    "prefill_ms",
    "ttft_ms",
    "decode_tok_s",
    "peak_mem_mb",
    "kv_cache_mb",
    "vision_gflops",
    "prefill_gflops",
    "ideal_prefill_ms",
    "ideal_decode_tok_s",
    "overhead_ms",
    "prefill_speedup",
)


@dataclass
class BenchSettings:
    batch: int = 1
    image_size: tuple[int, int] | None = None  # (height, width); None: the shape's default
    prompt_tokens: int = 64
    new_tokens: int = 32
    warmup: int = 2
    repeats: int = 5
    dtype: str = "bfloat16"
    attn: str = "sdpa"
    device: str = "cuda"
    seed: int = 0


class _Clock:
    """Median milliseconds of a callable: CUDA events on a GPU, perf_counter elsewhere."""

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.cuda = device.type == "cuda"
        self.warmup, self.repeats = warmup, repeats

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, Any]:
        out = None
        for _ in range(self.warmup):
            out = fn()
        times = []
        for _ in range(self.repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                import time

                t0 = time.perf_counter()
                out = fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times), out


class _Steps:
    """A generate() streamer that timestamps every step (after a device sync): the decode rate of one
    call, without subtracting two noisy timings."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.times: list[float] = []

    def put(self, value) -> None:  # first call: the prompt; then one call per new token
        import time

        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def rate(self, batch: int) -> float | None:
        """Tokens per second of the batch over the steps after the first new token."""
        steps = len(self.times) - 2
        if steps < 1 or self.times[-1] <= self.times[1]:
            return None
        return batch * steps / (self.times[-1] - self.times[1])


def cache_bytes(cache: Any) -> int:
    """Bytes of the tensors a KV cache holds (any Cache class or a legacy tuple), found by walking the
    object rather than by the attribute names a release uses; shared storage counts once."""
    total, seen, stack, visited = 0, set(), [cache], set()
    while stack:
        item = stack.pop()
        if id(item) in visited:
            continue
        visited.add(id(item))
        if isinstance(item, torch.Tensor):
            key = (item.untyped_storage().data_ptr(), item.device)
            if key not in seen and item.device.type != "meta":
                seen.add(key)
                total += item.untyped_storage().nbytes()
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif hasattr(item, "__dict__") and not isinstance(item, (type, torch.nn.Module)):
            stack.extend(vars(item).values())
    return total


def cache_length(cache: Any) -> int | None:
    return None if cache is None else _cache_length(cache)


def gqa_sdpa_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """FLOPs of a fused SDPA kernel, also when keys/values have fewer heads than its queries
    (grouped-query attention, ``enable_gqa``: torch's own formula asserts equal heads; each query
    head still attends over every key, so count with the keys' heads expanded to the queries')."""
    from torch.utils.flop_counter import sdpa_flop_count

    b, h = query_shape[0], query_shape[1]
    return sdpa_flop_count(tuple(query_shape), (b, h, *key_shape[2:]), (b, h, *value_shape[2:]))


def _gqa_mapping() -> dict:
    names = (
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",  # torch counts nothing for it otherwise
    )
    return {getattr(torch.ops.aten, n): gqa_sdpa_flops for n in names if hasattr(torch.ops.aten, n)}


def _gflops(fn: Callable[[], Any], log: Callable[[str], None] | None = None) -> float | None:
    from torch.utils.flop_counter import FlopCounterMode

    try:
        with FlopCounterMode(display=False, custom_mapping=_gqa_mapping()) as counter:
            fn()
    except Exception as exc:  # noqa: BLE001 - the number is optional; say why it is missing
        if log is not None:
            log(f"note: FLOP counting failed ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})")
        return None
    return counter.get_total_flops() / 1e9


def _feature_module(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    return inner if inner is not None and hasattr(inner, "get_image_features") else model


def _pixel_kwargs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    import inspect

    params = inspect.signature(_feature_module(model).get_image_features).parameters
    return {k: v for k, v in inputs.items() if k in params}


def _reset_rope_deltas(model: nn.Module) -> None:
    """Qwen-style models cache M-RoPE deltas of the last prompt; a text-only call must not reuse them."""
    for module in (model, getattr(model, "model", None)):
        if module is not None and hasattr(module, "rope_deltas"):
            module.rope_deltas = None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "device"


class _Runner:
    def __init__(
        self, model: nn.Module, inputs: dict[str, torch.Tensor], settings: BenchSettings, device, log=print
    ):
        self.model, self.inputs, self.s = model, inputs, settings
        self.log = log
        self.device = device
        self.clock = _Clock(device, settings.warmup, settings.repeats)
        self.pixels = _pixel_kwargs(model, inputs)
        self.gen = {"do_sample": False, "pad_token_id": model.generation_config.pad_token_id}

    def _generate(self, n: int, **inputs):
        return self.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **self.gen)

    def _decode_rate(self, **inputs) -> float | None:
        """Median decode rate (tokens/s of the batch) over timed generate calls of ``new_tokens``."""
        rates: list[float | None] = []

        def run():
            steps = _Steps(self.device.type == "cuda")
            self._generate(self.s.new_tokens, streamer=steps, **inputs)
            rates.append(steps.rate(inputs["attention_mask"].shape[0]))

        self.clock(run)
        timed = [r for r in rates[-self.s.repeats :] if r is not None]
        return statistics.median(timed) if timed else None

    @torch.no_grad()
    def measure(self) -> dict[str, Any]:
        model, clock = self.model, self.clock
        fm = _feature_module(model)
        row: dict[str, Any] = {}
        row["vision_ms"], _ = clock(lambda: fm.get_image_features(**self.pixels))
        row["prefill_ms"], out = clock(lambda: model(**self.inputs, use_cache=True, logits_to_keep=1))
        cache = find_cache(out)
        row["kv_tokens"] = cache_length(cache)
        row["kv_cache_mb"] = cache_bytes(cache) / 2**20
        del out, cache
        state = getattr(model, "prune_state", None)
        if state is not None and state.last is not None:
            batch = self.inputs["input_ids"].shape[0]
            row["vision_tokens_before"] = state.last.vision_tokens_before / batch
            row["vision_tokens_after"] = state.last.vision_tokens_after / batch
        row["ttft_ms"], _ = clock(lambda: self._generate(1, **self.inputs))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        row["decode_tok_s"] = self._decode_rate(**self.inputs)
        if self.device.type == "cuda":
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        row["vision_gflops"] = _gflops(lambda: fm.get_image_features(**self.pixels), self.log)
        row["prefill_gflops"] = _gflops(
            lambda: model(**self.inputs, use_cache=True, logits_to_keep=1), self.log
        )
        return row

    @torch.no_grad()
    def ideal(self, length: int) -> dict[str, float]:
        """The unwrapped language model on ``length`` rows of embeddings (no images)."""
        model, clock = self.model, self.clock
        batch = self.inputs["input_ids"].shape[0]
        dim = model.get_input_embeddings().weight.shape[1]
        dtype = model.get_input_embeddings().weight.dtype
        gen = torch.Generator(device=self.device).manual_seed(self.s.seed)
        embeds = torch.randn(batch, length, dim, generator=gen, device=self.device, dtype=dtype) * 0.02
        mask = torch.ones(batch, length, dtype=torch.long, device=self.device)

        def prefill():
            _reset_rope_deltas(model)
            return model(inputs_embeds=embeds, attention_mask=mask, use_cache=True, logits_to_keep=1)

        lm_ms, _ = clock(prefill)
        _reset_rope_deltas(model)
        return {
            "lm_prefill_ms": lm_ms,
            "decode_tok_s": self._decode_rate(inputs_embeds=embeds, attention_mask=mask),
        }


def _empty_row(method: str, keep: float | int) -> dict[str, Any]:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(method=method, keep=keep, status="ok")
    return row


def run_bench(
    spec: M.ModelSpec,
    methods: Sequence[str],
    keeps: Sequence[float | int],
    settings: BenchSettings,
    *,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the model, measure the unpruned model and every method x keep; returns the JSON dict."""
    from tqdm.auto import tqdm

    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise M.ModelSpecError("--device cuda but torch sees no CUDA device (use --device cpu)")
    dtype = M.DTYPES[settings.dtype]
    import time

    t0 = time.perf_counter()
    model = M.build_model(
        spec, device=device, dtype=dtype, attn_implementation=settings.attn, seed=settings.seed
    )
    build_s = time.perf_counter() - t0
    processor = M.build_image_processor(spec)
    height, width = settings.image_size or spec.image_size
    from .tasks.shapes import random_scene, render_scene

    images = [
        render_scene(random_scene(settings.seed + b), size=(width, height)) for b in range(settings.batch)
    ]
    inputs = M.make_inputs(
        model,
        processor,
        images,
        prompt_tokens=settings.prompt_tokens,
        seed=settings.seed,
        device=device,
        dtype=dtype,
        spec=spec,
    )
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    log(
        f"{spec.name}: {type(model).__name__}, {_params(M.parameter_count(model) / 1e9)} parameters "
        f"({'pretrained' if spec.pretrained else 'random weights'}), built on {device} in {build_s:.1f} s; "
        f"batch {settings.batch}, image {height}x{width}, prompt {inputs['input_ids'].shape[1]} tokens"
    )
    runner = _Runner(model, inputs, settings, device, log)
    with torch.no_grad():  # untimed: kernels selected, allocator and clocks warm before the first row
        for _ in range(max(1, settings.warmup)):
            model(**inputs, use_cache=True, logits_to_keep=1)
            runner._generate(min(4, settings.new_tokens), **inputs)
    runner.clock.sync()
    plan = [("none", 1.0)] + [(m, k) for m in methods for k in keeps]
    rows: list[dict[str, Any]] = []
    bar = tqdm(plan, desc="bench", unit="row", disable=not progress)
    for method, keep in bar:
        bar.set_postfix_str(f"{method} keep={keep}")
        row = _empty_row(method, keep)
        try:
            if method != "none":
                prune.wrap(model, method, keep=keep)
            row.update(runner.measure())
        except (TypeError, ValueError) as exc:  # method or family not supported: keep the row, say why
            row["status"] = f"unsupported: {exc}"
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            row["status"] = "OOM"
        finally:
            if getattr(model, "prune_state", None) is not None:
                prune.unwrap(model)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
    base = rows[0]
    seq_len = int(inputs["input_ids"].shape[1])
    n_vision = int(sum(M.feature_counts(model, runner.pixels)) / settings.batch)
    if base["status"] == "ok":
        base["vision_tokens_before"] = base["vision_tokens_after"] = n_vision
    # the ideal: same model, an input with just the kept number of tokens
    ideal_cache: dict[int, dict[str, float]] = {}
    for row in tqdm([r for r in rows if r["status"] == "ok"], desc="ideal", unit="row", disable=not progress):
        row["seq_len"] = seq_len
        if row["vision_tokens_before"]:
            row["keep_ratio"] = row["vision_tokens_after"] / row["vision_tokens_before"]
        length = row["kv_tokens"]
        if length not in ideal_cache:
            try:
                ideal_cache[length] = runner.ideal(length)
            except RuntimeError as exc:
                if not _is_oom(exc):
                    raise
                ideal_cache[length] = {}
        ideal = ideal_cache[length]
        if ideal:
            row["ideal_prefill_ms"] = base["vision_ms"] + ideal["lm_prefill_ms"]
            row["ideal_decode_tok_s"] = ideal["decode_tok_s"]
            row["overhead_ms"] = row["prefill_ms"] - row["ideal_prefill_ms"]
        if base["status"] == "ok" and row["prefill_ms"]:
            row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
    return {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {
            "name": spec.name,
            "architecture": type(model).__name__,
            "source": str(spec.path) if spec.pretrained else "shape (random weights)",
            "parameters_b": round(M.parameter_count(model) / 1e9, 6),
            "weights_mb": round(weights_mb, 1),
            "build_s": round(build_s, 2),
        },
        "environment": {
            "device": _device_name(device),
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "prune": prune.__version__,
        },
        "settings": {**asdict(settings), "image_size": [height, width]},
        "rows": [_round(r) for r in rows],
    }


def _round(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ROW_FIELDS:
        value = row.get(key)
        if isinstance(value, float):
            value = None if math.isnan(value) else round(value, 4)
        out[key] = value
    return out


# ---- outputs --------------------------------------------------------------------------------------


def _params(billions: float) -> str:
    return f"{billions:.2f}B" if billions >= 0.1 else f"{billions * 1e3:.2f}M"


def _sig(value: float | None) -> str:
    """Three significant digits (GFLOPs span 0.01 on tiny models to 10^4 at 7B)."""
    if value is None:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3g}"


def markdown(result: dict[str, Any]) -> str:
    """A markdown table of a bench result."""
    m, env, s = result["model"], result["environment"], result["settings"]
    lines = [
        f"### {m['name']} on {env['device']}, batch {s['batch']}",
        "",
        f"{m['architecture']}, {_params(m['parameters_b'])} parameters, {m['source']}; batch {s['batch']}, "
        f"image {s['image_size'][0]}x{s['image_size'][1]}, {s['prompt_tokens']} text tokens, "
        f"{s['new_tokens']} new tokens, {s['dtype']}, attention {s['attn']}; medians of {s['repeats']} runs "
        f"after {s['warmup']} warm-up runs. torch {env['torch']}, transformers {env['transformers']}.",
        "",
        "| method | keep | vision tokens | vision ms | prefill ms | ideal prefill ms | overhead ms | speedup | "
        "TTFT ms | decode tok/s | peak MiB | KV MiB | prefill GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in result["rows"]:
        if r["status"] != "ok":
            notes.append(f"- {r['method']} keep={r['keep']}: {r['status']}")
            lines.append(f"| {r['method']} | {r['keep']} | " + " | ".join(["n/a"] * 11) + " |")
            continue
        tokens = f"{_fmt(r['vision_tokens_after'], 0)}/{_fmt(r['vision_tokens_before'], 0)}"
        lines.append(
            f"| {r['method']} | {r['keep']} | {tokens} | {_fmt(r['vision_ms'])} | {_fmt(r['prefill_ms'])} | "
            f"{_fmt(r['ideal_prefill_ms'])} | {_fmt(r['overhead_ms'])} | {_fmt(r['prefill_speedup'], 2)}x | "
            f"{_fmt(r['ttft_ms'])} | {_fmt(r['decode_tok_s'])} | {_fmt(r['peak_mem_mb'], 0)} | "
            f"{_fmt(r['kv_cache_mb'], 1)} | {_sig(r['prefill_gflops'])} |"
        )
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Prefill (with the ideal dashed), TTFT and decode rate against the kept fraction, per method."""
    from . import plots

    ok = [r for r in result["rows"] if r["status"] == "ok"]
    base = next((r for r in ok if r["method"] == "none"), None)
    fig, axes = plots.figure(3)
    panels = [
        ("prefill_ms", "prefill ms", "ideal_prefill_ms"),
        ("ttft_ms", "time to first token, ms", None),
        ("decode_tok_s", "decode tokens/s", "ideal_decode_tok_s"),
    ]
    for ax, (key, label, ideal_key) in zip(axes, panels):
        series, ideal = {}, []
        for r in ok:
            if r["method"] == "none" or r["keep_ratio"] is None:
                continue
            series.setdefault(r["method"], []).append((r["keep_ratio"], r[key]))
            if ideal_key:
                ideal.append((r["keep_ratio"], r[ideal_key]))
        plots.lines_vs_keep(ax, series, ylabel=label, title=label, baseline=base and base[key], ideal=ideal)
    fig.suptitle(f"{result['model']['name']} on {result['environment']['device']}", fontsize=10)
    return plots.save(fig, path)


def write_outputs(
    result: dict[str, Any], out_dir: str | Path, *, log: Callable[[str], None] = print
) -> dict[str, Path]:
    """``bench_<model>_<device>.{json,md,png}`` in ``out_dir``; the PNG is skipped (with a note) when
    matplotlib is missing."""
    from .plots import PlotUnavailable

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{_slug(result['model']['name'])}_{_slug(result['environment']['device'])}"
    if result["settings"]["batch"] != 1:
        stem += f"_b{result['settings']['batch']}"
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    try:
        paths["png"] = plot(result, out_dir / f"{stem}.png")
        text += f"\n![{result['model']['name']}]({paths['png'].name})\n"
    except PlotUnavailable as exc:
        log(f"note: {exc}; wrote JSON and markdown only")
    paths["md"].write_text(text)
    return paths


def load_result(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path} is not a prune bench result (schema {data.get('schema')!r})")
    return data
