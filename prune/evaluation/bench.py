"""`prune bench`: what pruning saves at real scale, per method x keep, measured round-robin.

For one model (a shipped shape with random weights built on the device, or a local pretrained
folder) and one batch of prompts with an image each, every configuration (the unpruned model, each
method x keep, and the "ideal" inputs below) is measured **once per round**, for ``rounds`` rounds
after ``warmup`` rounds, the order rotating by one each round. A shared machine drifts by tens of
percent over minutes; measured this way the drift lands on every row alike instead of on whichever
row ran during it. Per row:

- ``vision_ms``: the image encoder and projector (``get_image_features``), with the method's signal
  collection when the model is wrapped;
- ``prefill_ms``: one forward over the prompt (vision encoder + pruning + language-model prefill);
  ``prefill_median_ms`` and ``prefill_spread`` ((max - min) / min over the rounds) beside it;
- ``host_ms``: the host's time from the prefill call to its return, before synchronising: when it
  is close to ``prefill_ms`` the row is launch-bound (the GPU waits for Python);
- ``ttft_ms``: ``generate`` with one new token (prefill, first token, generate's own overhead);
- ``decode_tok_s``: tokens per second of the batch over the decoding steps (the ``new_tokens`` - 1
  steps after the first new token, timestamped inside one generate call); best and median;
- ``peak_mem_mb``: the allocator's peak during the decode-timing generate calls (CUDA only);
- ``kv_cache_mb`` / ``kv_tokens``: the cache the prefill leaves (bytes of all layers' keys and values);
- ``vision_gflops`` / ``prefill_gflops``: FLOPs counted by ``torch.utils.flop_counter`` (matmuls and
  attention of the model; prune's own statistics kernels are not counted);
- ``ideal_prefill_ms``: what the prefill would cost if pruning were free. ``ideal = "kept-length"``
  (vision-side methods): the unwrapped vision encoder's time plus the unwrapped language model's
  prefill on ``inputs_embeds`` of exactly ``kv_tokens`` rows, both measured round-robin with the
  rest. ``ideal = "flops-weighted"`` (in-LLM methods, whose layers see different token counts): the
  unwrapped encoder's time plus the full-length language-model prefill scaled by the row's
  language-model FLOPs over the unpruned model's (``prefill_gflops - vision_gflops``);
- ``prefill_speedup`` (over the unpruned row), ``ideal_speedup``, and ``ratio_to_ideal`` =
  achieved / ideal speedup = ``ideal_prefill_ms / prefill_ms``: 1.0 means the pruning machinery is
  free; ``overhead_ms = prefill_ms - ideal_prefill_ms``.

A wrapped row is timed after one untimed prefill of each wrap: a wrapped model keeps the host plan of
a selection call per call structure (``Adapter._call_plan``), so its timed calls are the steady
state a served model runs in, not a first call. Times are the minimum over rounds (the best estimate of what the code costs), CUDA events on a GPU
(``time.perf_counter`` on CPU). With ``compile``, every configuration gets its own copy of the
model whose language model runs under ``torch.compile(mode="reduce-overhead")`` with a static KV
cache (CUDA graphs; the pruned length is fixed per batch), pruned and unpruned alike: the prefill
and the decode step, one graph each (every decode step the same graph: prune maps it in fixed
shapes); in-LLM methods compile the decode step only (their prefill ranks on the host). Rows of a
method the model's family does not support, or that run out of memory, keep their place with a
``status`` saying why.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import prune

from .._compat import cache_length as _cache_length
from .._compat import cache_parameter, find_cache
from ..hooks import adapter_for
from ..hooks import vision_attention as VA  # noqa: N812
from ..hooks import vision_compile as VC  # noqa: N812
from ..hooks import vision_graphs as VG  # noqa: N812
from ..methods import get_method
from . import models as M
from ._format import fmt as _fmt

SCHEMA = "prune.bench/2"
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
    "prefill_median_ms",
    "prefill_spread",
    "host_ms",
    "ttft_ms",
    "ttft_median_ms",
    "decode_tok_s",
    "decode_median_tok_s",
    "peak_mem_mb",
    "kv_cache_mb",
    "vision_gflops",
    "prefill_gflops",
    "ideal",
    "ideal_prefill_ms",
    "ideal_decode_tok_s",
    "overhead_ms",
    "prefill_speedup",
    "ideal_speedup",
    "ratio_to_ideal",
)


@dataclass
class BenchSettings:
    batch: int = 1
    image_size: tuple[int, int] | None = None  # (height, width); None: the shape's default
    prompt_tokens: int = 64
    new_tokens: int = 32
    warmup: int = 2  # rounds before the timed ones
    rounds: int = 10
    dtype: str = "bfloat16"
    attn: str = "sdpa"
    device: str = "cuda"
    seed: int = 0
    compile: bool = False
    #: every row's vision layers as CUDA graphs (``vision_graphs=True``; the unpruned row's too)
    vision_graphs: bool = False
    #: every row's vision layers through torch.compile (``vision_compile=True``; the unpruned row's too)
    vision_compile: bool = False


class _Clock:
    """One timed call: (GPU ms by CUDA events or host ms on CPU, host ms to return, result)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> tuple[float, float, Any]:
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        out = fn()
        host = (time.perf_counter() - t0) * 1e3
        if not self.cuda:
            return host, host, out
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), host, out


class _Steps:
    """A generate() streamer that timestamps every step (after a device sync): the decode rate of one
    call, without subtracting two noisy timings."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.times: list[float] = []

    def put(self, value) -> None:  # first call: the prompt; then one call per new token
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


def _language_model(model: nn.Module) -> nn.Module:
    return adapter_for(model).language_model()


def _compile_language_model(model: nn.Module, prefill: bool = True, **options: Any) -> None:
    """The language model's forward under ``torch.compile(mode="reduce-overhead")`` (CUDA graphs),
    set on the instance (``del lm.forward`` undoes it); prune's language-model hook stays outside
    the graph, and on a static cache every decode step is the same graph (fixed shapes).

    ``prefill=False``: only decode steps (one new token) run compiled, the prefill eagerly, as
    ``generate`` does when it compiles. For in-LLM methods: their prefill ranks the cut on the host
    inside the decoder-layer loop, which breaks the graph there, and dynamo then gives up on the
    language model's frame for every later call too (each layer its own graph, decode included)."""
    lm = _language_model(model)
    eager = lm.forward
    compiled = torch.compile(eager, **({"mode": "reduce-overhead"} | options), dynamic=False)
    if prefill:
        lm.forward = compiled
        return

    def forward(*args, **kwargs):
        embeds = kwargs.get("inputs_embeds")
        step = embeds is not None and embeds.shape[1] == 1
        return (compiled if step else eager)(*args, **kwargs)

    lm.forward = forward


def _compile_limits(settings: BenchSettings):
    """Compiled: room for every shape the rows need (each prompt length, ideal length and the decode
    step is a graph of its own under ``dynamic=False``), for the bench only."""
    import contextlib

    if not settings.compile:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(cache_size_limit=64, accumulated_cache_size_limit=512)


@dataclass
class _Samples:
    """The timed rounds of one configuration."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, key: str, value: float | None) -> None:
        if value is not None:
            self.values.setdefault(key, []).append(value)

    def low(self, key: str) -> float | None:
        return min(self.values[key]) if self.values.get(key) else None

    def high(self, key: str) -> float | None:
        return max(self.values[key]) if self.values.get(key) else None

    def median(self, key: str) -> float | None:
        return statistics.median(self.values[key]) if self.values.get(key) else None

    def spread(self, key: str) -> float | None:
        low = self.low(key)
        return (self.high(key) - low) / low if low else None


class _Measure:
    """What every configuration shares: the inputs, the clock and the generate arguments."""

    def __init__(self, inputs: dict[str, torch.Tensor], settings: BenchSettings, device, log) -> None:
        self.inputs, self.s, self.device, self.log = inputs, settings, device, log
        self.clock = _Clock(device)
        self.cache_kwargs = _CacheMaker(settings.compile, inputs, settings.new_tokens).kwargs
        # one owner of every row's vision-layer graphs (keys carry the weights' addresses: copies differ)
        self.graphs = VG.VisionGraphs(max_shapes=64) if settings.vision_graphs else None
        self.compiled = VC.VisionCompile() if settings.vision_compile else None  # one compiled function

    def generate_kwargs(self, model: nn.Module) -> dict[str, Any]:
        kwargs = {"do_sample": False, "pad_token_id": model.generation_config.pad_token_id}
        if self.s.compile:  # the language model is compiled already: generate must not compile the whole
            kwargs.update(self.cache_kwargs(model), disable_compile=True)  # generate passes it to forward
        return kwargs

    def generate(self, model: nn.Module, n: int, **inputs):
        _reset_rope_deltas(model)
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, **self.generate_kwargs(model))

    def decode_rate(self, model: nn.Module, samples: _Samples, **inputs) -> None:
        steps = _Steps(self.device.type == "cuda")
        self.generate(model, self.s.new_tokens, streamer=steps, **inputs)
        samples.add("decode_tok_s", steps.rate(inputs["attention_mask"].shape[0]))


def unwrapped_vision(adapter, graphs: VG.VisionGraphs | None, compiled: VC.VisionCompile | None) -> list:
    """On an unwrapped model (an unpruned row), what a wrap with those vision options installs: the
    segmented attention where the encoder has segments, then the compiled layers, then the graphs;
    returns the functions that take them off."""
    removers = []
    if adapter.segmented_vision:
        removers += VA.install(adapter.vision_attention_modules())
    if compiled is not None:
        removers += VC.install(adapter, compiled)[1]
    if graphs is not None:
        removers += VG.install(adapter, graphs)[1]
    return removers


class _Config:
    """The unpruned model or one method x keep: wrapped for its round, unwrapped after (or, compiled,
    its own wrapped copy of the model)."""

    def __init__(
        self, method: str, keep: float | int, model: nn.Module, shared: _Measure, options: dict | None = None,
        label: str | None = None,
    ) -> None:
        self.method, self.keep, self.model, self.m = method, keep, model, shared
        self.options = dict(options or {})
        self.row = _empty_row(label or method, keep)
        self.samples = _Samples()
        self.own_copy = False
        self.fresh_wrap = False  # wrapped since the last measurement: its per-wrap plans are not made yet
        self.pixels = _pixel_kwargs(model, shared.inputs)
        self._removers: list = []

    @property
    def in_llm(self) -> bool:
        return self.method != "none" and bool(getattr(get_method(self.method), "in_llm", False))

    def enter(self) -> None:
        graphs, compiled = self.m.graphs, self.m.compiled
        if self.method == "none":
            if (graphs is not None or compiled is not None) and not self._removers:
                # the unpruned encoder, graphed / compiled as the pruned ones
                self._removers += unwrapped_vision(adapter_for(self.model), graphs, compiled)
            return
        if getattr(self.model, "prune_state", None) is None:
            # the encoder's own attention, as in the unpruned row and the ideal: rows compare like with
            # like (prune bench-encoder measures the segmented vision attention); with vision graphs or
            # compiled layers, the segmented one where the encoder has segments (its default path
            # splits them on the host)
            segmented = (graphs is not None or compiled is not None) and adapter_for(self.model).segmented_vision
            prune.wrap(self.model, self.method, keep=self.keep, vision_attention="segmented" if segmented else "default",
                       vision_graphs=graphs is not None, vision_compile=compiled is not None, **self.options)
            self.fresh_wrap = True
            if compiled is not None:
                VC.share(self.model, compiled)
            if graphs is not None:
                VG.share(self.model, graphs)

    def exit(self) -> None:
        if not self.own_copy and getattr(self.model, "prune_state", None) is not None:
            prune.unwrap(self.model)
        if not self.own_copy:
            for remove in reversed(self._removers):
                remove()
            self._removers = []

    def own(self, model: nn.Module) -> None:
        """Measure on ``model`` (a copy made for this configuration), wrapped once and kept so."""
        self.model, self.own_copy = model, True
        self.enter()

    def prefill(self):
        _reset_rope_deltas(self.model)
        return self.model(**self.m.inputs, use_cache=True, logits_to_keep=1, **self.m.cache_kwargs(self.model))

    def probe(self) -> None:
        """One untimed call: the cache, the kept tokens and the FLOPs (sizes, not times)."""
        model, m = self.model, self.m
        fm = _feature_module(model)
        out = self.prefill()
        cache = find_cache(out)
        self.row["kv_tokens"] = cache_length(cache)
        self.row["kv_cache_mb"] = cache_bytes(cache) / 2**20
        del out, cache
        state = getattr(model, "prune_state", None)
        if state is not None and state.last is not None:
            batch = m.inputs["input_ids"].shape[0]
            self.row["vision_tokens_before"] = state.last.vision_tokens_before / batch
            self.row["vision_tokens_after"] = state.last.vision_tokens_after / batch
        if not m.s.compile:  # a FLOP counter around CUDA graphs counts nothing
            self.row["vision_gflops"] = _gflops(lambda: fm.get_image_features(**self.pixels), m.log)
            self.row["prefill_gflops"] = _gflops(self.prefill, m.log)

    def measure(self, samples: _Samples) -> None:
        m, fm = self.m, _feature_module(self.model)
        ms, _, _ = m.clock(lambda: fm.get_image_features(**self.pixels))
        samples.add("vision_ms", ms)
        if self.fresh_wrap:  # steady state, as a served model sees it: the wrap's plans made untimed
            self.prefill()
            self.fresh_wrap = False
        ms, host, out = m.clock(self.prefill)
        samples.add("prefill_ms", ms)
        samples.add("host_ms", host)
        del out
        ms, _, _ = m.clock(lambda: m.generate(self.model, 1, **m.inputs))
        samples.add("ttft_ms", ms)
        if m.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        m.decode_rate(self.model, samples, **m.inputs)
        if m.device.type == "cuda":
            samples.add("peak_mem_mb", torch.cuda.max_memory_allocated() / 2**20)


class _Ideal:
    """The unwrapped language model on ``length`` rows of embeddings (no images)."""

    def __init__(self, length: int, model: nn.Module, shared: _Measure) -> None:
        self.length, self.model, self.m = length, model, shared
        self.samples = _Samples()
        batch = shared.inputs["input_ids"].shape[0]
        weight = model.get_input_embeddings().weight
        gen = torch.Generator(device=shared.device).manual_seed(shared.s.seed)
        self.embeds = torch.randn(batch, length, weight.shape[1], generator=gen, device=shared.device,
                                  dtype=weight.dtype) * 0.02
        self.mask = torch.ones(batch, length, dtype=torch.long, device=shared.device)

    def enter(self) -> None:
        pass

    exit = enter

    def prefill(self):
        _reset_rope_deltas(self.model)
        return self.model(inputs_embeds=self.embeds, attention_mask=self.mask, use_cache=True, logits_to_keep=1,
                          **self.m.cache_kwargs(self.model))

    def measure(self, samples: _Samples) -> None:
        ms, host, _ = self.m.clock(self.prefill)
        samples.add("prefill_ms", ms)
        samples.add("host_ms", host)
        self.m.decode_rate(self.model, samples, inputs_embeds=self.embeds, attention_mask=self.mask)


def _round_robin(configs: list, settings: BenchSettings, progress: bool, log) -> None:
    """Every configuration once per round, the order rotated by one each round; the first ``warmup``
    rounds are not recorded. A configuration that runs out of memory is dropped with status OOM."""
    from tqdm.auto import tqdm

    total = settings.warmup + settings.rounds
    active = list(configs)
    for r in tqdm(range(total), desc="rounds", unit="round", disable=not progress):
        shift = r % max(1, len(active))
        for cfg in active[shift:] + active[:shift]:
            samples = cfg.samples if r >= settings.warmup else _Samples()
            try:
                cfg.enter()
                with torch.no_grad():
                    cfg.measure(samples)
            except RuntimeError as exc:
                if not _is_oom(exc):
                    raise
                getattr(cfg, "row", {})["status"] = "OOM"
                active.remove(cfg)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            finally:
                cfg.exit()


def run_bench(
    spec: M.ModelSpec,
    methods: Sequence[str],
    keeps: Sequence[float | int],
    settings: BenchSettings,
    *,
    options: dict[str, dict[str, Any]] | None = None,
    stages: Sequence[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Build the model, measure the unpruned model and every method x keep round-robin; returns the
    JSON dict. ``options``: method name -> options passed to ``prune.wrap``. ``stages``: for methods
    with a ``stage`` option, one row per stage ("post_encoder", "encoder"), labelled
    ``hiprune (stage=encoder)``, in the same rounds."""
    device = torch.device(settings.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise M.ModelSpecError("--device cuda but torch sees no CUDA device (use --device cpu)")
    if settings.compile and device.type != "cuda":
        raise M.ModelSpecError("--compile times CUDA graphs: it needs --device cuda")
    if settings.vision_graphs and device.type != "cuda":
        raise M.ModelSpecError("--vision-graphs replays CUDA graphs: it needs --device cuda")
    dtype = M.DTYPES[settings.dtype]
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
        f"batch {settings.batch}, image {height}x{width}, prompt {inputs['input_ids'].shape[1]} tokens; "
        f"{settings.rounds} rounds after {settings.warmup} warm-up rounds"
        + (", language model compiled (reduce-overhead, static cache)" if settings.compile else "")
        + (", vision layers compiled" if settings.vision_compile else "")
        + (", vision layers as CUDA graphs" if settings.vision_graphs else "")
    )
    shared = _Measure(inputs, settings, device, log)
    options = options or {}
    configs = [_Config("none", 1.0, model, shared)]
    for m in methods:
        staged = bool(stages) and "stage" in get_method(m).defaults
        for stage in stages if staged else [None]:
            opts = {**options.get(m, {}), **({"stage": stage} if stage else {})}
            label = f"{m} (stage={stage})" if stage else None
            configs += [_Config(m, k, model, shared, opts, label=label) for k in keeps]
    with _compile_limits(settings):
        probe_configs(configs, model, settings, log)
    live = [c for c in configs if c.row["status"] == "ok"]
    base = configs[0]
    seq_len = int(inputs["input_ids"].shape[1])
    lengths = sorted({c.row["kv_tokens"] for c in live if not c.in_llm} | {seq_len})
    ideal_model = base.model
    ideals = {n: _Ideal(n, ideal_model, shared) for n in lengths}
    with _compile_limits(settings):
        _round_robin(live + list(ideals.values()), settings, progress, log)
    n_vision = int(sum(M.feature_counts(model, base.pixels)) / settings.batch)
    if base.row["status"] == "ok":
        base.row["vision_tokens_before"] = base.row["vision_tokens_after"] = n_vision
    for cfg in configs:
        _summarize(cfg, base, ideals, seq_len)
    if base.row["status"] == "ok":
        for cfg in configs:
            _ratios(cfg.row, base.row)
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
        "settings": {**asdict(settings), "image_size": [height, width], "options": options,
                     "stages": list(stages) if stages else None},
        "rows": [_round(c.row) for c in configs],
    }


class _CacheMaker:
    """The KV-cache argument of a timed forward or generate: none (the model makes a dynamic cache),
    or, compiled, one static cache per model (for ``inputs`` and ``new_tokens`` more), reset before
    every call. Its first use runs the language model eagerly: a static cache allocates its tensors on
    first use and marks them static for CUDA graphs only outside a compiled region (transformers
    expects the prefill uncompiled)."""

    def __init__(self, compile: bool, inputs: dict[str, torch.Tensor], new_tokens: int) -> None:
        self.compile, self.inputs = compile, inputs
        self.max_len = int(inputs["input_ids"].shape[1]) + new_tokens + 8
        self.caches: dict[int, Any] = {}

    def kwargs(self, model: nn.Module) -> dict[str, Any]:
        if not self.compile:
            return {}
        from transformers import StaticCache

        cache = self.caches.get(id(model))
        if cache is None:
            cache = self.caches[id(model)] = StaticCache(config=model.config, max_cache_len=self.max_len)
            lm = _language_model(model)
            compiled = lm.__dict__.pop("forward", None)
            try:
                with torch.no_grad():
                    _reset_rope_deltas(model)
                    model(**self.inputs, **{cache_parameter(model.forward): cache}, use_cache=True, logits_to_keep=1)
            finally:
                if compiled is not None:
                    lm.forward = compiled
        cache.reset()
        return {cache_parameter(model.forward): cache}


def probe_configs(configs: list[_Config], model: nn.Module, settings: BenchSettings, log) -> None:
    """Wrap every configuration once: refuse what the family does not support (status), read sizes
    and FLOPs, and, compiled, give each configuration its own compiled copy of the model (copied
    before the unpruned model, the original, is compiled)."""
    for cfg in configs:
        try:
            cfg.enter()
            if settings.compile and cfg.method != "none":
                cfg.exit()
                own = copy.deepcopy(model)
                _compile_language_model(own, prefill=not cfg.in_llm)
                cfg.own(own)
            with torch.no_grad():
                cfg.probe()
        except (TypeError, ValueError) as exc:  # method or family not supported: keep the row, say why
            cfg.row["status"] = f"unsupported: {exc}"
        except RuntimeError as exc:
            if not _is_oom(exc):
                raise
            cfg.row["status"] = "OOM"
        finally:
            cfg.exit()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    if settings.compile:
        _compile_language_model(model)


def _summarize(cfg: _Config, base: _Config, ideals: dict[int, _Ideal], seq_len: int) -> None:
    row, s = cfg.row, cfg.samples
    if row["status"] != "ok":
        return
    row["seq_len"] = seq_len
    for key in ("vision_ms", "prefill_ms", "ttft_ms", "host_ms"):
        row[key] = s.low(key)
    row["prefill_median_ms"], row["prefill_spread"] = s.median("prefill_ms"), s.spread("prefill_ms")
    row["ttft_median_ms"] = s.median("ttft_ms")
    row["decode_tok_s"], row["decode_median_tok_s"] = s.high("decode_tok_s"), s.median("decode_tok_s")
    row["peak_mem_mb"] = s.high("peak_mem_mb")
    if row["vision_tokens_before"]:
        row["keep_ratio"] = row["vision_tokens_after"] / row["vision_tokens_before"]
    vision = base.samples.low("vision_ms")
    if vision is None:
        return
    if cfg.in_llm:
        full, lm_base = ideals[seq_len].samples.low("prefill_ms"), _lm_gflops(base.row)
        lm_row = _lm_gflops(row)
        if full is not None and lm_base and lm_row is not None:
            row["ideal"], row["ideal_prefill_ms"] = "flops-weighted", vision + full * lm_row / lm_base
        return
    ideal = ideals.get(row["kv_tokens"])
    if ideal is not None and ideal.samples.low("prefill_ms") is not None:
        row["ideal"] = "kept-length"
        row["ideal_prefill_ms"] = vision + ideal.samples.low("prefill_ms")
        row["ideal_decode_tok_s"] = ideal.samples.high("decode_tok_s")


def _lm_gflops(row: dict[str, Any]) -> float | None:
    if row["prefill_gflops"] is None or row["vision_gflops"] is None:
        return None
    return row["prefill_gflops"] - row["vision_gflops"]


def _ratios(row: dict[str, Any], base: dict[str, Any]) -> None:
    if row["status"] != "ok" or not row["prefill_ms"]:
        return
    row["prefill_speedup"] = base["prefill_ms"] / row["prefill_ms"]
    if row["ideal_prefill_ms"]:
        row["overhead_ms"] = row["prefill_ms"] - row["ideal_prefill_ms"]
        row["ideal_speedup"] = base["prefill_ms"] / row["ideal_prefill_ms"]
        row["ratio_to_ideal"] = row["ideal_prefill_ms"] / row["prefill_ms"]


def _empty_row(method: str, keep: float | int) -> dict[str, Any]:
    row = dict.fromkeys(ROW_FIELDS)
    row.update(method=method, keep=keep, status="ok")
    return row


def _round(row: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key in ROW_FIELDS:
        value = row.get(key)
        if isinstance(value, float):  # six significant digits: tiny models' GFLOPs are 1e-2
            value = None if math.isnan(value) else float(f"{value:.6g}")
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


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def markdown(result: dict[str, Any]) -> str:
    """A markdown table of a bench result."""
    m, env, s = result["model"], result["environment"], result["settings"]
    compiled = (
        (", language model compiled (reduce-overhead, static cache)" if s.get("compile") else "")
        + (", vision layers compiled (vision_compile)" if s.get("vision_compile") else "")
        + (", vision layers as CUDA graphs (vision_graphs)" if s.get("vision_graphs") else "")
    )
    lines = [
        f"### {m['name']} on {env['device']}, batch {s['batch']}{' (compiled)' if s.get('compile') else ''}",
        "",
        f"{m['architecture']}, {_params(m['parameters_b'])} parameters, {m['source']}; batch {s['batch']}, "
        f"image {s['image_size'][0]}x{s['image_size'][1]}, {s['prompt_tokens']} text tokens, "
        f"{s['new_tokens']} new tokens, {s['dtype']}, attention {s['attn']}{compiled}. Round-robin: every row "
        f"once per round, {s['rounds']} rounds after {s['warmup']} warm-up rounds; times are the minimum over "
        f"rounds (median and spread = (max - min) / min beside prefill). Ideal: the unwrapped encoder plus the "
        "language model on the kept length (kept-length), or for in-LLM methods the full-length language "
        f"model scaled by the row's FLOPs (flops-weighted). torch {env['torch']}, transformers {env['transformers']}.",
        "",
        "| method | keep | vision tokens | vision ms | prefill ms | median | spread | host ms | ideal ms | "
        "ratio to ideal | speedup | TTFT ms | decode tok/s | peak MiB | KV MiB | prefill GFLOPs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in result["rows"]:
        if r["status"] != "ok":
            notes.append(f"- {r['method']} keep={r['keep']}: {r['status']}")
            lines.append(f"| {r['method']} | {r['keep']} | " + " | ".join(["n/a"] * 14) + " |")
            continue
        tokens = f"{_fmt(r['vision_tokens_after'], 0)}/{_fmt(r['vision_tokens_before'], 0)}"
        ideal = _fmt(r["ideal_prefill_ms"]) + (" (F)" if r["ideal"] == "flops-weighted" else "")
        lines.append(
            f"| {r['method']} | {r['keep']} | {tokens} | {_fmt(r['vision_ms'])} | {_fmt(r['prefill_ms'])} | "
            f"{_fmt(r['prefill_median_ms'])} | {_pct(r['prefill_spread'])} | {_fmt(r['host_ms'])} | {ideal} | "
            f"{_fmt(r['ratio_to_ideal'], 3)} | {_fmt(r['prefill_speedup'], 2)}x | {_fmt(r['ttft_ms'])} | "
            f"{_fmt(r['decode_tok_s'])} | {_fmt(r['peak_mem_mb'], 0)} | {_fmt(r['kv_cache_mb'], 1)} | "
            f"{_sig(r['prefill_gflops'])} |"
        )
    if any(r["ideal"] == "flops-weighted" for r in result["rows"]):
        notes.append("- (F): flops-weighted ideal (in-LLM method)")
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

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"bench_{_slug(result['model']['name'])}_{_slug(result['environment']['device'])}"
    if result["settings"]["batch"] != 1:
        stem += f"_b{result['settings']['batch']}"
    if result["settings"].get("compile"):
        stem += "_compiled"
    return write_files(result, out_dir, stem, markdown, plot, log)


def write_files(result: dict[str, Any], out_dir: Path, stem: str, markdown, plot, log) -> dict[str, Path]:
    """``<stem>.json``, ``.md`` (with the plot linked) and ``.png`` (no PNG without matplotlib)."""
    from .plots import PlotUnavailable

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
