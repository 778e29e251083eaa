"""Compiled vision-encoder layers (``vision_compile=True``).

The full Qwen2.5-VL-7B encoder at batch 1 is GPU-bound, and much of its time is in small kernels a
compiler fuses away: fp32 casts of the RMSNorm and the rotary embedding, elementwise products, the
SiLU-gated MLP's pointwise part (benchmarks/results/h200/NOTES.md: 46 ms of kernels, about a third of
it outside the GEMMs and attention). Compiling the layers themselves, rather than the whole model,
leaves everything prune does between layers (the encoder-stage cut, statistics taps, the feature
function's bookkeeping) eager and unchanged.

How (:class:`VisionCompile`, one per wrapped model; :class:`CompiledLayer`, each layer's ``forward`` as
an instance attribute, so the layer's hooks still run around it, eagerly):

- One ``torch.compile``d function runs every layer: it takes the layer's class ``forward`` and the
  layer as arguments, so identical layers share one compiled graph (their weights are its inputs)
  instead of recompiling per layer until dynamo's recompile limit stops compiling. Each owner compiles
  its own copy of that function (a code object of its own), so several wrapped models in one process
  do not share, and exhaust, one cache. ``dynamic=None``: a second input size recompiles once with
  symbolic sizes; later sizes reuse it. After :data:`MAX_GRAPHS` graphs an owner compiles no more:
  argument structures (shapes, dtypes, plain values) that ran compiled before still do, a new one
  runs eagerly. Without that cap, dynamo's recompile limit (8 per code object) falls back frame by
  frame and compiles every nested module's forward on the way, a compile storm that made a
  benchmark's calls several times slower than eager. (A global ``torch.compiler.set_stance`` is not
  used: it also stops prune's own FlexAttention compiling a new length, which then runs unfused.)
- The segmented vision attention (``vision_attention="segmented"``) enters the compiled graph as one
  opaque operator (``prune::segmented_attention``): no graph break; it runs its own FlexAttention.
- Eager instead, always correct: with autograd on; inside an outer ``torch.compile`` (which traces the
  layer itself); under a dispatch mode (a FLOP counter); after the compiler failed once (it warns and
  every layer of the model stays eager).
- Layers whose attention a statistics tap or the encoder stage's key mask redirects stay eager, as
  under ``vision_graphs`` (the tap hands tensors to Python code per call).

With ``vision_graphs=True`` as well, each compiled layer is then captured as a CUDA graph: the
compiler removes the small kernels, the graph removes their launches.
"""

from __future__ import annotations

import functools
import itertools
import threading
import warnings
from typing import Any

import torch
from torch import nn
from torch.utils import _python_dispatch

from .base import InstanceOverride
from .vision_graphs import LayerOwner

_COUNTER = itertools.count()
#: graphs one owner compiles before it stops compiling new input structures (dynamo's own limit per
#: code object is 8; past it dynamo falls back frame by frame, compiling every nested module's forward)
MAX_GRAPHS = 6


def _run_layer(forward, layer, *args, **kwargs):
    return forward(layer, *args, **kwargs)


def _fresh_function():
    """A copy of :func:`_run_layer` with a code object of its own (dynamo caches per code object)."""
    from ..kernels.segmented_attention import renamed_copy

    return renamed_copy(_run_layer, f"_prune_vision_layer_{next(_COUNTER)}")


def _compiler_errors() -> tuple[type[BaseException], ...]:
    from torch._dynamo import exc

    return tuple(t for t in (getattr(exc, "BackendCompilerFailed", None), getattr(exc, "InternalTorchDynamoError", None),
                             getattr(exc, "Unsupported", None)) if isinstance(t, type))


_COMPILER_ERRORS = _compiler_errors()
#: dynamo's recompile limit per code object (its default): an owner never lets a call reach it
_DYNAMO_LIMIT = 8


def _structure(args: tuple, kwargs: dict) -> tuple:
    """What a compiled graph is specialised on, as far as prune can tell: the arguments' nesting and
    each leaf's shape, dtype and device (tensors) or value (plain values) or type (anything else).
    Hand-written rather than a pytree flatten: it runs on every layer call (4 us, not 16)."""
    return _key(args), _key(kwargs)


_PLAIN = (int, float, bool, str, type(None))


def _key(value: Any):
    if isinstance(value, torch.Tensor):
        return value.shape, value.dtype, value.device
    if isinstance(value, (tuple, list)):
        return type(value), tuple(_key(v) for v in value)
    if isinstance(value, dict):
        return dict, tuple((k, _key(v)) for k, v in value.items())
    if isinstance(value, _PLAIN):
        return type(value), value
    return type(value)


class VisionCompile(LayerOwner):
    """The compiled vision layers of one wrapped model (see the module docstring).

    ``backend``: a ``torch.compile`` backend (``torch.compiler.list_backends()``); "inductor" fuses.
    ``stats()``: compiled and eager calls, whether the compiler failed (with why), the layers skipped.
    Copies and pickles compile their own function (a compiled one holds this model's guards)."""

    _settings = ("backend",)

    def __init__(self, backend: str = "inductor") -> None:
        self.backend = backend
        self.skipped: dict[int, str] = {}
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._function = None
        self.failed: str | None = None
        self.graphs = 0  # graphs the backend compiled for this owner
        self._compiled: set[tuple] = set()  # argument structures that ran compiled
        self.counts = {"compiled": 0, "eager": 0, "capped": 0}

    def stats(self) -> dict[str, Any]:
        """Calls run compiled, eagerly, and eagerly past :data:`MAX_GRAPHS` (``capped``: a structure
        no graph was compiled for); graphs compiled; the compiler's failure; skipped layers."""
        return {**self.counts, "graphs": self.graphs, "failed": self.failed, "skipped": dict(self.skipped)}

    def _count(self, gm, example_inputs):
        """The backend, counting the graphs it compiles."""
        self.graphs += 1
        backend = torch._dynamo.lookup_backend(self.backend) if isinstance(self.backend, str) else self.backend
        return backend(gm, example_inputs)

    def function(self):
        with self._lock:
            if self._function is None:
                self._function = torch.compile(_fresh_function(), backend=self._count, dynamic=None)
            return self._function

    def run(self, layer: nn.Module, forward, args: tuple, kwargs: dict):
        """``forward(layer, *args, **kwargs)``, compiled where it can be."""
        if (
            self.failed is not None
            or torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            or _python_dispatch._get_current_dispatch_mode() is not None
        ):
            self.counts["eager"] += 1
            return forward(layer, *args, **kwargs)
        sig = _structure(args, kwargs)
        if self.graphs >= MAX_GRAPHS and (sig not in self._compiled or self.graphs >= _DYNAMO_LIMIT):
            self.counts["capped"] += 1  # a structure no graph was compiled for: eager, compiling nothing
            return forward(layer, *args, **kwargs)
        try:
            out = self.function()(forward, layer, *args, **kwargs)
        except _COMPILER_ERRORS as error:
            cause = getattr(error, "inner_exception", None) or error.__cause__ or error  # the backend's own error
            why = f"{type(cause).__name__}: {cause}".splitlines()[0][:300]
            self.failed = why
            warnings.warn(f"prune: vision_compile: the vision layers run eagerly (torch.compile failed: {why})",
                          RuntimeWarning, stacklevel=4)
            self.counts["eager"] += 1
            return forward(layer, *args, **kwargs)
        if len(self._compiled) < 4096:
            self._compiled.add(sig)
        self.counts["compiled"] += 1
        return out


class CompiledLayer(InstanceOverride):
    """A vision layer's ``forward`` that runs compiled (:class:`VisionCompile`)."""

    def __init__(self, module: nn.Module, owner: VisionCompile) -> None:
        super().__init__(module, "forward")
        self.owner = owner

    def __call__(self, *args, **kwargs):
        if self.below is not None:  # another wrapper's forward: compiled as a bound method
            return self.owner.run(self.below, _call_bound, args, kwargs)
        return self.owner.run(self.module, type(self.module).forward, args, kwargs)


def _call_bound(bound, *args, **kwargs):
    return bound(*args, **kwargs)


def check(adapter, attention: str) -> None:
    """Raise ValueError (naming the argument) where ``vision_compile=True`` cannot work."""
    from .vision_attention import require_segmented

    require_segmented(adapter, attention, "vision_compile=True", "which breaks the compiled graph at every window")


def install(adapter, owner: VisionCompile | None = None) -> tuple[VisionCompile, list]:
    """Compile every vision layer no prune view redirects; returns the owner and the functions that
    put the layers back. A new owner's compiled function is dropped with them; a given one's stays
    (a benchmark that re-wraps keeps what earlier rounds compiled: :func:`share`)."""
    from .vision_graphs import owned_layers

    given = owner is not None
    owner = owner if given else VisionCompile()
    removers = [CompiledLayer(layer, owner).install() for _, layer in owned_layers(adapter, owner)]
    if not given:  # a new owner's compiled function goes with the layers; a given one's stays (share)
        removers.append(functools.partial(owner._reset))
    return owner, removers


def share(model: nn.Module, owner: VisionCompile) -> None:
    """Point a model wrapped with ``vision_compile=True`` at ``owner`` (another wrap's): its compiled
    function, compiled once, serves every wrap. For benchmarks that re-wrap one model per row."""
    from .vision_graphs import share_owner

    share_owner(model, owner, CompiledLayer, "owner", "vision_compile")


__all__ = ["CompiledLayer", "VisionCompile", "check", "install", "share"]
