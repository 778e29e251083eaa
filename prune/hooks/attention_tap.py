"""Read a layer's post-RoPE Q and K without changing what the layer computes.

transformers' attention modules call ``ALL_ATTENTION_FUNCTIONS.get_interface(
self.config._attn_implementation, eager_attention_forward)`` with the layer's own q, k, v. We
register one stateless function under the name ``"prune_tap"`` and point only the tapped modules
at it through a per-module view of their config. The function calls the implementation the model
was loaded with (eager, sdpa, flash...) and hands q and k to the module's tap callback, so the
layer's output is bit-identical and no attention matrix is ever requested from the model.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

TAP_NAME = "prune_tap"
#: the tap's name over a module whose own implementation's name contains "flash" (FlashAttention, or
#: prune's segmented vision attention): transformers picks a module's code path by that substring
#: (``is_flash_attention_requested``), so the tapped module keeps its one-call ``cu_seqlens`` path
TAP_FLASH_NAME = "prune_tap_flash"
_TAP_ATTR = "_prune_tap"
STATS_ONLY_ATTR = "_prune_stats_only"


class ConfigView:
    """A module's config with ``_attn_implementation`` read as the subclass's ``_prune_name`` (an
    attention function its ``register`` puts in transformers' ``AttentionInterface``); everything else,
    reads and writes, goes to the real config. Pickles as the view, registering the function again."""

    _prune_name: str = ""

    @staticmethod
    def register() -> None:
        raise NotImplementedError

    def __init__(self, base: Any) -> None:
        object.__setattr__(self, "_prune_base", base)

    @property
    def _attn_implementation(self) -> str:
        return self._prune_name

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_prune_base"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_prune_base"), name, value)

    def __reduce__(self):
        return rebuild_view, (type(self), object.__getattribute__(self, "_prune_base"))


def rebuild_view(cls: type[ConfigView], base: Any) -> ConfigView:
    """Unpickle a view: its attention function must be registered in this process too."""
    cls.register()
    return cls(base)


class _ConfigView(ConfigView):
    """The view of a tapped module: its attention runs the tap."""

    _prune_name = TAP_NAME

    @staticmethod
    def register() -> None:
        _ensure_registered()


class _FlashConfigView(_ConfigView):
    """The view of a tapped module whose own attention is flash-routed: the same tap, a name that
    keeps transformers' varlen path (one call with ``cu_seq_lens_q``; the statistics then take the
    segments from that argument)."""

    _prune_name = TAP_FLASH_NAME


def _inner_implementation(module: torch.nn.Module) -> Callable:
    impl = module.config._prune_base._attn_implementation
    if impl in (None, "eager"):
        # The eager function of the module's own modeling file (they differ per family).
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[impl]


def _tap_attention(module: torch.nn.Module, query, key, value, attention_mask, **kwargs):
    callback = getattr(module, _TAP_ATTR, None)
    if getattr(module, STATS_ONLY_ATTR, False):
        # A call made only to read q and k (e.g. a later layer's attention on the uncut sequence):
        # skip the attention itself; the caller discards the output.
        callback(module, query, key, attention_mask, kwargs)
        batch, heads, length, dim = query.shape
        return query.new_zeros(batch, length, heads, value.shape[-1]), None
    out = _inner_implementation(module)(module, query, key, value, attention_mask, **kwargs)
    if callback is not None:
        callback(module, query, key, attention_mask, kwargs)
    return out


def _ensure_registered() -> None:
    for name in (TAP_NAME, TAP_FLASH_NAME):
        if name not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(name, _tap_attention)


def install_tap(module: torch.nn.Module, callback: Callable) -> Callable[[], None]:
    """Make ``callback(module, q, k, attention_mask, kwargs)`` run after each attention call of
    ``module``; returns a function that removes the tap and restores the module exactly."""
    if not hasattr(module, "config"):
        raise TypeError(f"{type(module).__name__} has no config: cannot tap its attention function")
    if isinstance(module.config, _ConfigView):
        raise RuntimeError(f"{type(module).__name__} is already tapped")
    _ensure_registered()
    original_config = module.config
    # the same code path as untapped: a module routed to its cu_seqlens path (FlashAttention, prune's
    # segmented view) stays there instead of splitting its segments on the host, one call each
    flash = "flash" in str(original_config._attn_implementation or "")
    module.config = (_FlashConfigView if flash else _ConfigView)(original_config)
    setattr(module, _TAP_ATTR, callback)
    return functools.partial(_untap, module, original_config)  # copies and pickles follow a partial


def _untap(module: torch.nn.Module, original_config: Any) -> None:
    module.config = original_config
    if hasattr(module, _TAP_ATTR):
        delattr(module, _TAP_ATTR)

