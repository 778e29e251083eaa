"""prune: make a Hugging Face vision-language model read fewer vision tokens, without forking it.

import prune
model = prune.wrap(model, method="hiprune", keep=0.33)
model.generate(**inputs)
model.prune_state.last.keep_mask      # what the language model saw
prune.unwrap(model)
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._compat import warn_if_untested
from .config import PruneConfig
from .hooks import adapter_for
from .hooks import vision_attention as _vision_attention
from .hooks import vision_compile as _vision_compile
from .hooks import vision_graphs as _vision_graphs
from .methods import get_method, method_names
from .state import PruneRecord, PruneState

__all__ = ["PruneConfig", "PruneRecord", "PruneState", "available_methods", "unwrap", "wrap"]
__version__ = "0.1.0"


def wrap(
    model: nn.Module,
    method: str | PruneConfig = "hiprune",
    keep: float | int = 0.33,
    *,
    positions: str | None = None,
    vision_attention: str | None = None,
    vision_graphs: bool = False,
    vision_compile: bool = False,
    **options: Any,
) -> nn.Module:
    """Install pruning hooks on ``model`` in place and return it.

    Args:
        model: a supported Hugging Face model (see the README's table), any attention implementation.
        method: a method name, or a :class:`PruneConfig` (then ``keep``/``positions``/options must be unset).
        keep: fraction in (0, 1] of each image's vision tokens, or an int >= 1 tokens per image.
        positions: "original" | "compact" | None (the method's preset for this model family).
        vision_attention: "segmented" | "default" | None: "segmented" runs the vision encoder's windowed /
            per-image attention as one FlexAttention call per layer (Qwen-family encoders; compiled on
            CUDA), "default" leaves the model's implementation; None: segmented for Qwen-family
            encoders on CUDA loaded with eager / SDPA, default elsewhere. ``prune_state.vision_attention``
            says what was installed.
        vision_graphs: replay every vision-encoder layer as a CUDA graph (captured per layer the second
            time an input shape is seen; at most 8 shapes kept): layers that wait for kernel launches
            (few rows: the blocks after an encoder-stage cut, small ViTs at batch 1) stop waiting; a
            GPU-bound layer gains nothing. CUDA only, inference only (autograd runs eagerly);
            Qwen-family encoders need the segmented vision attention. Layers whose attention prune
            taps for statistics stay eager. ``prune_state.vision_graphs.stats()`` counts captures and
            replays.
        vision_compile: run every vision-encoder layer through ``torch.compile`` (inductor; one compiled
            graph serves all identical layers, compiled on the first call of each new input size
            class): the norms, rotary embedding and MLP's pointwise kernels fuse, which is where a
            GPU-bound encoder spends time outside its GEMMs. Inference only (autograd runs eagerly);
            Qwen-family encoders need the segmented vision attention; tapped layers stay eager. With
            ``vision_graphs=True`` too, the compiled layers are replayed as CUDA graphs.
            ``prune_state.vision_compile.stats()`` counts compiled and eager calls.
        **options: method options, e.g. ``alpha=0.1`` for hiprune (``prune methods`` lists them).

    Wrapping a wrapped model replaces its config. ``model.prune_state.last`` records the last prefill.
    """
    warn_if_untested()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(method, PruneConfig):
        if options or positions is not None or vision_attention is not None or vision_graphs or vision_compile:
            raise TypeError("pass either a PruneConfig or method/keep/options, not both")
        config = method
    else:
        config = PruneConfig(
            method=method, keep=keep, positions=positions, options=options, vision_attention=vision_attention,
            vision_graphs=vision_graphs, vision_compile=vision_compile,
        )
    adapter = adapter_for(model)  # raises for unsupported classes before anything changes
    attention = _vision_attention.resolve(adapter, config.vision_attention)
    if config.vision_graphs:
        _vision_graphs.check(adapter, attention)
    if config.vision_compile:
        _vision_compile.check(adapter, attention)
    positions_mode, method_options = config.resolved(adapter.family)
    preset = getattr(get_method(config.method), "preset_positions", None)
    if config.positions is None and preset in adapter.position_modes:
        positions_mode = preset  # the mode of the method's reference implementation
    if positions_mode not in adapter.position_modes:
        raise ValueError(
            f"positions={positions_mode!r} is not supported on {type(model).__name__}; "
            f"use one of {adapter.position_modes} (M-RoPE families keep original (t, h, w) ids)"
        )
    method_obj = get_method(config.method)(**method_options)
    method_obj.check_encoder(adapter.encoder_info())
    previous = getattr(model, "prune_state", None)
    if previous is not None:
        unwrap(model)
    state = PruneState(config=config, family=adapter.family, positions=positions_mode, vision_attention=attention)
    try:
        adapter.install(state, method_obj)
        if config.vision_compile:  # after the method's hooks: it leaves the layers they redirect eager
            state.vision_compile, removers = _vision_compile.install(adapter)
            state._removers.extend(removers)
        if config.vision_graphs:  # last (over the compiled layers): it leaves redirected layers eager
            state.vision_graphs, removers = _vision_graphs.install(adapter)
            state._removers.extend(removers)
    except BaseException:
        for remove in reversed(state._removers):
            remove()
        if previous is not None:
            wrap(model, previous.config)  # a failed re-wrap leaves the previous wrap in place
        raise
    model.prune_state = state
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """Remove every hook ``wrap`` installed and restore what it changed; returns the model."""
    state = getattr(model, "prune_state", None)
    if state is None:
        raise ValueError("this model is not wrapped by prune")
    for remove in reversed(state._removers):
        remove()
    state._removers.clear()
    del model.prune_state
    return model


def available_methods() -> dict[str, str]:
    """Method names with a one-line description."""
    return {name: get_method(name).description for name in method_names()}
