"""One-call segmented attention for the vision encoder of a wrapped model (``vision_attention=``).

Qwen-family vision attention (Qwen2-VL, Qwen2.5-VL, Qwen2.5-Omni, Qwen3-VL, Qwen3.5; transformers
5.17 to 5.25) chooses between two paths in its forward::

    if is_flash_attention_requested(self.config):    # "flash" in config._attn_implementation
        attention_interface(self, q, k, v, None, cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, ...)
    else:                                              # one call per window / image
        [attention_interface(self, q_i, k_i, v_i, None, ...) for each segment]

The decision is by *name*: ``transformers.utils.generic.is_flash_attention_requested`` tests whether
``"flash"`` is a substring of ``config._attn_implementation``. So the seam is a function registered
through transformers' public ``AttentionInterface`` under a name that contains "flash"
(:data:`SEGMENTED_NAME`), and a per-module view of the config whose ``_attn_implementation`` reads
as that name (the same mechanism as the statistics tap, ``attention_tap.py``), set on the vision
encoder's attention modules only: the language model, other models and the global registry's
existing entries are untouched, and ``unwrap`` puts the original config objects back.

The dependency is checked twice: at wrap time (:func:`seam_available`: the helper still answers
True for our name and the modeling file still uses it) and by tests that count the calls (one call
per layer, with ``cu_seq_lens_q``). If a release routes the module to its per-segment loop anyway,
the function still computes the right attention (it runs the model's own implementation on each
segment) and warns once.

Composition with the statistics tap: the tap is installed *over* this view (``Adapter.install``
installs this first). Over a flash-routed module the tap's own name contains "flash" too
(``attention_tap.TAP_FLASH_NAME``), so a tapped layer takes the same one-call path as the others:
the tap hands q and k (and ``cu_seq_lens_q``, from which the statistics take the segments) to its
callback and calls its base implementation, this function. (Until 2026-12-04 the tap's name had no
"flash": a tapped layer ran transformers' per-segment loop, whose ``lengths.tolist()`` on a device
``cu_seqlens`` synchronised the host with the GPU in the middle of the encoder.)
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..kernels.segmented_attention import segmented_attention
from .attention_tap import ConfigView

#: must contain "flash": that is what routes a Qwen vision attention to its cu_seqlens path
SEGMENTED_NAME = "prune_segmented_flash"
VISION_ATTENTION = ("segmented", "default")
_SEAM_HELPER = "is_flash_attention_requested"
_warned: set[str] = set()


class SegmentedConfigView(ConfigView):
    """The module's config with ``_attn_implementation`` read as :data:`SEGMENTED_NAME`."""

    _prune_name = SEGMENTED_NAME

    @staticmethod
    def register() -> None:
        _ensure_registered()


def _own_view(module: nn.Module) -> SegmentedConfigView | None:
    """The segmented view under the module's config (directly, or below other prune views)."""
    config = module.__dict__.get("config", getattr(module, "config", None))
    for _ in range(8):
        if isinstance(config, SegmentedConfigView):
            return config
        try:
            config = object.__getattribute__(config, "_prune_base")
        except AttributeError:
            return None
    return None


def _loaded_config(module: nn.Module) -> Any:
    """The module's real config, below any prune view (segmented or statistics tap)."""
    config = module.config
    for _ in range(8):
        try:
            config = object.__getattribute__(config, "_prune_base")
        except AttributeError:
            break
    return config


def _base_implementation(module: nn.Module) -> Callable:
    """The attention function the module was loaded with (eager: its own modeling file's)."""
    view = _own_view(module)
    impl = object.__getattribute__(view, "_prune_base")._attn_implementation
    if impl in (None, "eager"):
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def segmented_attention_function(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The registered attention function. With ``cu_seq_lens_q`` (the module's varlen path): one
    segmented-attention call over all segments. Without (a per-segment call): the module's own
    implementation, unchanged."""
    cu_seqlens = kwargs.get("cu_seq_lens_q")
    if cu_seqlens is None:
        if module.__dict__.get("config") is _own_view(module):  # not under a tap: the seam did not route
            name = type(module).__name__
            if name not in _warned:
                _warned.add(name)
                warnings.warn(
                    f"vision_attention='segmented': {name} called its attention per segment, not once with "
                    "cu_seqlens (this transformers release decides the varlen path differently); running the "
                    "model's own implementation per segment",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _base_implementation(module)(module, query, key, value, attention_mask, **kwargs)
    cu_k = kwargs.get("cu_seq_lens_k")
    dropout = kwargs.get("dropout") or 0.0
    if attention_mask is not None or kwargs.get("is_causal") or (cu_k is not None and cu_k is not cu_seqlens) or (
        dropout > 0.0 and module.training
    ):
        raise NotImplementedError(
            "vision_attention='segmented' handles non-causal attention over the same segments for queries and "
            f"keys, without mask or dropout; {type(module).__name__} asked for more (pass vision_attention='default')"
        )
    out = segmented_attention(query, key, value, cu_seqlens, scale=kwargs.get("scaling"))  # (B, H, N, d)
    return out.transpose(1, 2).contiguous(), None  # (B, N, H, d), as transformers' attention functions


def _ensure_registered() -> None:
    if SEGMENTED_NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(SEGMENTED_NAME, segmented_attention_function)


def seam_available(modules: list[nn.Module]) -> str | None:
    """None when transformers will route ``modules`` to the one-call path under our name, else why not."""
    try:
        from transformers.utils.generic import is_flash_attention_requested
    except ImportError:
        return f"transformers.utils.generic has no {_SEAM_HELPER}"
    try:
        routed = is_flash_attention_requested(requested_attention_implementation=SEGMENTED_NAME)
    except TypeError:
        return f"{_SEAM_HELPER} has a new signature"
    if not routed:
        return f"{_SEAM_HELPER}({SEGMENTED_NAME!r}) is False"
    for module in modules:
        modeling = sys.modules.get(type(module).__module__)
        if getattr(modeling, _SEAM_HELPER, None) is None:
            return f"{type(module).__module__} no longer uses {_SEAM_HELPER}"
    return None


def resolve(adapter, requested: str | None) -> str:
    """The vision attention a wrap installs: ``requested``, or for None the documented default
    (segmented for encoders with segments on CUDA that run eager / SDPA; default elsewhere)."""
    if requested == "default":
        return "default"
    name = type(adapter.model).__name__
    if not adapter.segmented_vision:
        if requested == "segmented":
            raise ValueError(
                f"vision_attention='segmented': {name}'s vision encoder attends over whole images (no "
                "windows or segments to batch); use 'default'"
            )
        return "default"
    modules = adapter.vision_attention_modules()
    why = seam_available(modules)
    if requested == "segmented":
        if why is not None:
            raise ValueError(f"vision_attention='segmented' is not available with this transformers ({why})")
        return "segmented"
    if why is not None or not modules:
        return "default"
    impl = _loaded_config(modules[0])._attn_implementation  # a re-wrap still has the old views on
    param = next(modules[0].parameters(), None)
    return auto_choice(impl, param.device.type if param is not None else "meta")


def require_segmented(adapter, attention: str, option: str, why: str) -> None:
    """Raise ValueError (naming ``option``) where a Qwen-family encoder would split its segments on
    the host: ``attention`` is not "segmented" and the model was not loaded with FlashAttention."""
    if adapter.segmented_vision and attention != "segmented":
        impl = str(_loaded_config(adapter.vision_attention_modules()[0])._attn_implementation)
        if "flash" not in impl:
            raise ValueError(
                f"{option} on {type(adapter.model).__name__} needs vision_attention='segmented' (got {attention!r}): "
                f"its {impl} attention splits the windows on the host, {why}"
            )


def auto_choice(implementation: str | None, device_type: str) -> str:
    """``vision_attention=None`` on an encoder with segments: segmented where it pays (CUDA, and the
    encoder runs eager / SDPA, i.e. one call per segment); FlashAttention already takes cu_seqlens."""
    return "segmented" if device_type == "cuda" and implementation in (None, "eager", "sdpa") else "default"


#: the forward parameter through which a Qwen vision block hands its attention the longest segment
_MAX_LENGTH = "max_seqlen"


def _max_length_position(module: nn.Module) -> int | None:
    """The position of the attention forward's longest-segment parameter, None when it has none."""
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index(_MAX_LENGTH) if _MAX_LENGTH in names else None


def _bound_max_length(position: int, module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: where the caller left the longest segment unset, pass the row count (an
    upper bound). Without it the module computes ``(cu[1:] - cu[:-1]).max().item()`` for the varlen
    path, one device read per layer; the segmented function never reads the value."""
    if len(args) > position or kwargs.get(_MAX_LENGTH) is not None:
        return None
    rows = next((a for a in args if isinstance(a, torch.Tensor)), None)
    if rows is None:
        rows = next((v for v in kwargs.values() if isinstance(v, torch.Tensor) and v.is_floating_point()), None)
    if rows is None or rows.dim() < 1:
        return None
    return args, {**kwargs, _MAX_LENGTH: int(rows.shape[-2] if rows.dim() > 2 else rows.shape[0])}


def install(modules: list[nn.Module]) -> list[Callable[[], None]]:
    """Point each module at the segmented function; returns the functions that restore each exactly.
    Must run before a statistics tap is installed on the same module. Where the module's forward
    takes the longest segment (``max_seqlen``, found by its signature) and the caller passes none, a
    pre-hook passes an upper bound instead (:func:`_bound_max_length`): no device read per layer."""
    _ensure_registered()
    removers = []
    for module in modules:
        position = _max_length_position(module)
        if position is not None:
            hook = module.register_forward_pre_hook(functools.partial(_bound_max_length, position), with_kwargs=True)
            removers.append(hook.remove)
        config = getattr(module, "config", None)
        if config is None:
            raise TypeError(f"{type(module).__name__} has no config: cannot route its attention")
        if _own_view(module) is not None or getattr(config, "_prune_base", None) is not None:
            raise RuntimeError(f"{type(module).__name__}'s attention is already routed by prune")
        module.config = SegmentedConfigView(config)
        removers.append(functools.partial(_restore, module, config))  # a partial: copies and pickles follow
    return removers


def _restore(module: nn.Module, config: Any) -> None:
    module.config = config



__all__ = [
    "SEGMENTED_NAME",
    "VISION_ATTENTION",
    "SegmentedConfigView",
    "auto_choice",
    "install",
    "require_segmented",
    "resolve",
    "seam_available",
]
