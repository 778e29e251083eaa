"""CUDA graphs for the layers of a wrapped model's vision encoder (``vision_graphs=True``).

A vision layer on few rows is launch-bound: the host takes longer to queue its ~50 small kernels than
the GPU takes to run them, so a Qwen2.5-VL-7B block after an encoder-stage cut (11 % of the rows)
costs far more than 11 % of a full one. Replaying each layer as one CUDA graph removes the host from
the loop: the GPU time is what is left. (The full Qwen2.5-VL-7B encoder at 1344 px is GPU-bound at
batch 1, 46 ms of kernels: graphs do not shorten it; see benchmarks/results/h200/NOTES.md.)

How it works (:class:`VisionGraphs`, one per wrapped model; :class:`GraphedLayer`, each layer's
``forward`` as an instance attribute, so the layer's hooks, prune's encoder-stage hooks included, still
run around it, eagerly):

- A call is keyed by the *structure* of its arguments (the pytree of ``(args, kwargs)``: every
  tensor's shape, dtype, layout and device, every other leaf's value) and the addresses of the
  layer's weights (a model moved or cast after the wrap gets new graphs, never stale ones).
- The first call of a key runs eagerly (it compiles and tunes whatever the layer runs: FlexAttention,
  cuBLAS); the second captures the layer on a side stream into a pool shared by the model's graphs;
  later ones copy their tensors into the key's static inputs, replay, and return *copies* of the
  static outputs (so a caller that keeps a layer's output, e.g. ``output_hidden_states``, keeps its own).
  Layers of one key share their static inputs and outputs: replays are sequential (a lock; a call on
  another stream first waits for the previous replay), and an input already copied from the very same
  tensor (same object, same version) is not copied again, so the rotary tables and ``cu_seqlens`` that
  every block receives cross once per encoder call.
- Eager instead, always correct: outside CUDA; with autograd on; inside ``torch.compile`` tracing,
  another capture or a dispatch mode (a FLOP counter would count nothing of a replay); a leaf that is neither a tensor nor a plain value; a layer whose capture failed
  (it synchronises with the host, say): it warns once and stays eager.
- At most ``max_shapes`` input structures are kept (least recently used first out); a structure seen
  once is never captured, so a stream of ever-new image sizes costs one eager run each, not a graph.

Which layers: those whose attention no prune view other than the segmented one redirects. A
statistics tap (it hands tensors to Python code per call) or the encoder stage's key mask (a per-call
tensor) would be frozen into a graph, so those layers run eagerly. Encoders whose attention splits
segments on the host (Qwen under ``vision_attention="default"`` with SDPA / eager) cannot be captured:
``wrap`` refuses the combination.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading
import warnings
import weakref
from typing import Any

import torch
from torch import nn
from torch.utils import _python_dispatch
from torch.utils import _pytree as pytree

from ..kernels.segmented_attention import _version
from .attention_tap import ConfigView
from .base import InstanceOverride
from .vision_attention import SegmentedConfigView

#: input structures (shapes) whose graphs a model keeps
MAX_SHAPES = 8
_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device)


def _leaf_key(leaf: Any):
    if isinstance(leaf, torch.Tensor):
        if leaf.device.type != "cuda" or leaf.layout != torch.strided:
            return None
        return ("t", tuple(leaf.shape), leaf.dtype, leaf.device.index)
    if isinstance(leaf, _PLAIN):
        return ("v", type(leaf).__name__, leaf)
    return None


def _signature(leaves: list[Any], spec) -> tuple | None:
    keys = []
    for leaf in leaves:
        key = _leaf_key(leaf)
        if key is None:
            return None
        keys.append(key)
    return (str(spec), tuple(keys))


def _redirected(layer: nn.Module) -> bool:
    """True when a prune view other than the segmented attention redirects an attention inside."""
    for module in layer.modules():
        config = module.__dict__.get("config")
        for _ in range(8):
            if not isinstance(config, ConfigView):
                break
            if not isinstance(config, SegmentedConfigView):
                return True
            config = object.__getattribute__(config, "_prune_base")
    return False


class _Slot:
    """A static input tensor and the tensor it was last filled from (object and version)."""

    __slots__ = ("source", "static", "version")

    def __init__(self, like: torch.Tensor) -> None:
        self.static = torch.empty(like.shape, dtype=like.dtype, device=like.device)
        self.source: weakref.ref | None = None
        self.version = -1

    def fill(self, tensor: torch.Tensor) -> None:
        version = _version(tensor)
        if self.source is not None and self.source() is tensor and version >= 0 and version == self.version:
            return
        self.static.copy_(tensor)
        try:
            self.source, self.version = weakref.ref(tensor), version
        except TypeError:
            self.source, self.version = None, -1

    def forget(self) -> None:
        self.source, self.version = None, -1


def _clear_cublas_workspaces() -> None:
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


@contextlib.contextmanager
def _cublas_workspaces_in_pool():
    """Capture with cuBLAS workspaces allocated inside the graphs' pool, not outside it.

    cuBLAS keeps one workspace per (handle, stream) and a captured matmul bakes its address into the
    graph. A workspace made by an eager call (the warm-up run) lives in the ordinary allocator, and
    whoever clears the workspaces frees it: ``torch.compile(mode="reduce-overhead")`` does before
    and after each of its recordings, and ``torch.cuda.graph`` empties the cache, so the memory goes
    back to the driver (the next replay of our graph dies with "unspecified launch failure") or to
    another tensor (it silently overwrites it). Cleared before the capture, the capture allocates a
    new workspace in our pool, which our graphs keep alive; cleared after, no eager call goes on
    using memory of the pool (what torch's own cudagraph trees do, ``clear_cublas_manager``)."""
    _clear_cublas_workspaces()
    try:
        yield
    finally:
        _clear_cublas_workspaces()


class _Entry:
    __slots__ = ("graph", "out_leaves", "out_spec", "writes_inputs")

    def __init__(self, graph, out_leaves, out_spec, writes_inputs: bool) -> None:
        self.graph, self.out_leaves, self.out_spec, self.writes_inputs = graph, out_leaves, out_spec, writes_inputs


class LayerOwner:
    """What the per-model owners of the vision layers (graphs, compiled function) share: copies and
    pickles keep the settings named in ``_settings`` and the skipped layers, nothing built for this
    model (device addresses, guards); ``_reset`` starts them empty."""

    _settings: tuple[str, ...] = ()
    skipped: dict[int, str]

    def _reset(self) -> None:
        raise NotImplementedError

    def __getstate__(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in self._settings}, "skipped": dict(self.skipped)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in self._settings:
            setattr(self, name, state[name])
        self.skipped = dict(state["skipped"])
        self._reset()


class VisionGraphs(LayerOwner):
    """The CUDA graphs of one wrapped model's vision layers (see the module docstring).

    ``stats()``: captures, replays, eager runs and the layers that stay eager (with why). Copies
    (deepcopy too) and pickles start without graphs: they hold device addresses of this model."""

    _settings = ("max_shapes",)

    def __init__(self, max_shapes: int = MAX_SHAPES) -> None:
        self.max_shapes = max_shapes
        self.skipped = {}
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.RLock()
        self._pool = None
        self._inputs: dict[tuple, list[_Slot | None]] = {}
        self._outputs: dict[tuple, list[torch.Tensor | None]] = {}
        self._graphs: dict[tuple, _Entry] = {}
        self._shapes: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self._seen: collections.OrderedDict[tuple, None] = collections.OrderedDict()
        self._event: torch.cuda.Event | None = None
        self.eager_layers: dict[int, str] = {}  # layer -> why its capture failed
        self.counts = {"captures": 0, "replays": 0, "eager": 0}


    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "graphs": len(self._graphs), "shapes": len(self._shapes),
                    "eager_layers": dict(self.eager_layers), "skipped": dict(self.skipped)}

    def clear(self) -> None:
        """Drop every graph and static buffer (the memory goes back once nothing replays them)."""
        with self._lock:
            self._reset()

    # ---- one layer call -------------------------------------------------------------------
    def run(self, index: int, layer: nn.Module, forward, args: tuple, kwargs: dict):
        if (
            index in self.eager_layers
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or not torch.cuda.is_available()
            or torch.cuda.is_current_stream_capturing()
            or _python_dispatch._get_current_dispatch_mode() is not None  # FLOP counters, fake tensors
        ):
            return self._eager(forward, args, kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        sig = _signature(leaves, spec)
        if sig is None or not any(isinstance(x, torch.Tensor) for x in leaves):
            return self._eager(forward, args, kwargs)
        weights = tuple(t.data_ptr() for t in (*layer.parameters(), *layer.buffers()))
        key = (index, sig, weights)
        with self._lock:
            entry = self._graphs.get(key)
            if entry is None:
                if key not in self._seen:  # first sight: eager (warms up), captured on the second
                    self._seen[key] = None
                    while len(self._seen) > 64 * max(1, self.max_shapes):
                        self._seen.popitem(last=False)
                    return self._eager(forward, args, kwargs)
                entry = self._capture(index, forward, sig, leaves, spec)
                if entry is None:
                    return self._eager(forward, args, kwargs)
                self._graphs[key] = entry
            self._shapes.move_to_end(sig)
            return self._replay(entry, sig, leaves)

    def _eager(self, forward, args, kwargs):
        self.counts["eager"] += 1
        return forward(*args, **kwargs)

    def _static_inputs(self, sig: tuple, leaves: list[Any]) -> list[_Slot | None]:
        slots = self._inputs.get(sig)
        if slots is None:
            slots = [_Slot(x) if isinstance(x, torch.Tensor) else None for x in leaves]
            self._inputs[sig] = slots
            self._shapes[sig] = None
            while len(self._shapes) > self.max_shapes:
                self._evict(next(iter(self._shapes)))
        return slots

    def _evict(self, sig: tuple) -> None:
        self._shapes.pop(sig, None)
        self._inputs.pop(sig, None)
        for key in [k for k in self._outputs if k[0] == sig]:
            del self._outputs[key]
        for key in [k for k in self._graphs if k[1] == sig]:
            del self._graphs[key]

    def _fill(self, slots: list[_Slot | None], leaves: list[Any]) -> list[Any]:
        for slot, leaf in zip(slots, leaves, strict=True):
            if slot is not None:
                slot.fill(leaf)
        return [slot.static if slot is not None else leaf for slot, leaf in zip(slots, leaves, strict=True)]

    def _capture(self, index: int, forward, sig: tuple, leaves: list[Any], spec) -> _Entry | None:
        slots = self._static_inputs(sig, leaves)
        current = torch.cuda.current_stream()
        side = torch.cuda.Stream(device=current.device)
        try:
            static = self._fill(slots, leaves)
            args, kwargs = pytree.tree_unflatten(static, spec)
            side.wait_stream(current)
            with torch.cuda.stream(side):
                warm = forward(*args, **kwargs)  # on the static inputs: lazy state is theirs
            current.wait_stream(side)
            out_leaves, out_spec = pytree.tree_flatten(warm)
            if not any(isinstance(x, torch.Tensor) for x in out_leaves):
                raise TypeError("the layer returned no tensor")
            out_key = (sig, str(out_spec), tuple(_leaf_key(x) for x in out_leaves))
            if None in out_key[2]:
                raise TypeError("the layer returned a leaf that is neither a CUDA tensor nor a plain value")
            outs = self._outputs.get(out_key)
            if outs is None:  # allocated outside the graphs' pool: it outlives every capture
                outs = [torch.empty_like(x, memory_format=torch.contiguous_format) if isinstance(x, torch.Tensor)
                        else x for x in out_leaves]
                self._outputs[out_key] = outs
            del warm, out_leaves
            versions = [_version(s.static) if s is not None else None for s in slots]
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            side.wait_stream(current)
            with torch.cuda.stream(side), _cublas_workspaces_in_pool():
                graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
                try:
                    produced = pytree.tree_flatten(forward(*args, **kwargs))[0]
                    for out, value in zip(outs, produced, strict=True):
                        if isinstance(out, torch.Tensor):
                            out.copy_(value)
                    del produced
                finally:
                    graph.capture_end()
            current.wait_stream(side)
        except Exception as error:  # noqa: BLE001 - any capture failure: this layer stays eager
            torch.cuda.synchronize(current.device)
            self._pool = None  # a capture that failed leaves its pool unusable for the next one
            for slot in slots:
                if slot is not None:
                    slot.forget()
            why = f"{type(error).__name__}: {error}".splitlines()[0][:300]
            self.eager_layers[index] = why
            warnings.warn(f"prune: vision_graphs: vision layer {index} runs eagerly (its capture failed: {why})",
                          RuntimeWarning, stacklevel=4)
            return None
        writes = any(s is not None and _version(s.static) != v for s, v in zip(slots, versions, strict=True))
        self.counts["captures"] += 1
        return _Entry(graph, outs, out_spec, writes)

    def _replay(self, entry: _Entry, sig: tuple, leaves: list[Any]):
        current = torch.cuda.current_stream()
        if self._event is not None:
            current.wait_event(self._event)  # the previous replay may be on another thread's stream
        slots = self._inputs[sig]
        self._fill(slots, leaves)
        entry.graph.replay()
        if entry.writes_inputs:  # the layer wrote into an input: the slots no longer hold their sources
            for slot in slots:
                if slot is not None:
                    slot.forget()
        out = [x.clone() if isinstance(x, torch.Tensor) else x for x in entry.out_leaves]
        self._event = torch.cuda.Event()
        self._event.record(current)
        self.counts["replays"] += 1
        return pytree.tree_unflatten(out, entry.out_spec)


class GraphedLayer(InstanceOverride):
    """A vision layer's ``forward`` that replays CUDA graphs (:class:`VisionGraphs`)."""

    def __init__(self, module: nn.Module, graphs: VisionGraphs, index: int) -> None:
        super().__init__(module, "forward")
        self.graphs, self.index = graphs, index

    def __call__(self, *args, **kwargs):
        return self.graphs.run(self.index, self.module, self._original, args, kwargs)


def vision_layers(adapter) -> list[nn.Module]:
    """The vision encoder's layers, in order (the layer list that holds its attention modules)."""
    from .encoder_stage import layer_modules

    return layer_modules(adapter.model, adapter.vision_attention_modules())


def check(adapter, attention: str) -> None:
    """Raise ValueError (naming the argument) where ``vision_graphs=True`` cannot work."""
    from .vision_attention import require_segmented

    name = type(adapter.model).__name__
    require_segmented(adapter, attention, "vision_graphs=True", "which a CUDA graph cannot capture")
    for layer in vision_layers(adapter):
        for t in (*layer.parameters(), *layer.buffers()):
            if t.device.type != "cuda":
                raise ValueError(f"vision_graphs=True replays CUDA graphs: {name}'s vision encoder has weights on "
                                 f"{t.device} (move the model to CUDA first, without offloading)")


def install(adapter, graphs: VisionGraphs | None = None) -> tuple[VisionGraphs, list]:
    """Graph every vision layer no prune view redirects; returns the graphs' owner and the functions
    that take the graphs off again. A new owner's graphs are dropped with them; a given one's stay
    (a benchmark that re-wraps keeps what earlier rounds captured: :func:`share`)."""
    owner = graphs if graphs is not None else VisionGraphs()
    removers = [GraphedLayer(layer, owner, index).install() for index, layer in owned_layers(adapter, owner)]
    if graphs is None:
        removers.append(functools.partial(owner.clear))
    return owner, removers


def owned_layers(adapter, owner: LayerOwner) -> list[tuple[int, nn.Module]]:
    """(index, layer) of every vision layer no prune view redirects; the others go to ``owner.skipped``
    with why (a statistics tap hands tensors to Python per call; the encoder stage's key mask is a
    per-call tensor: neither may be frozen into a graph)."""
    owner.skipped = {}
    layers = []
    for index, layer in enumerate(vision_layers(adapter)):
        if _redirected(layer):
            owner.skipped[index] = "a prune statistics tap or mask redirects its attention"
        else:
            layers.append((index, layer))
    return layers


def share(model: nn.Module, graphs: VisionGraphs) -> None:
    """Point a model wrapped with ``vision_graphs=True`` at ``graphs`` (another wrap's owner): the
    layers compute the same function of the same inputs under any wrap that graphs them, so what one
    wrap captured the next replays. For benchmarks that re-wrap one model per configuration."""
    share_owner(model, graphs, GraphedLayer, "graphs", "vision_graphs")


def share_owner(model: nn.Module, owner: LayerOwner, override_cls: type, attribute: str, field: str) -> None:
    """Set ``attribute`` of every ``override_cls`` on the model's vision layers (wherever it stands
    in the layer's chain of ``forward`` overrides) and the state's ``field`` to ``owner``."""
    from . import adapter_for

    state = model.prune_state
    for layer in vision_layers(adapter_for(model)):
        override = layer.__dict__.get("forward")
        while override is not None:
            if isinstance(override, override_cls):
                setattr(override, attribute, owner)
            override = getattr(override, "below", None)
    owner.skipped = dict(getattr(state, field).skipped)
    setattr(state, field, owner)


__all__ = ["MAX_SHAPES", "GraphedLayer", "LayerOwner", "VisionGraphs", "check", "install", "owned_layers", "share",
           "share_owner", "vision_layers"]
