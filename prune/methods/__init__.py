"""Pruning methods: one file per method, registered by name."""

from __future__ import annotations

from .base import EncoderInfo, Method, Selection, SignalRequest, View

_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator that registers a :class:`Method` under ``name``."""

    def deco(method_cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is already registered")
        method_cls.name = name
        _REGISTRY[name] = method_cls
        return method_cls

    return deco


def get_method(name: str) -> type[Method]:
    if not isinstance(name, str):
        raise TypeError(f"method must be a string, got {type(name).__name__}")
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


def method_names() -> list[str]:
    return sorted(_REGISTRY)


# Import for registration side effects (after `register` exists).
from . import (  # noqa: E402,F401
    avpool,  # noqa: E402,F401  (audio-visual joint pool, Qwen2.5-Omni)
    cls,
    fastv,
    hiprune,
    pdrop,
    pool,
    random,
    transprune,
)

__all__ = [
    "EncoderInfo",
    "Method",
    "Selection",
    "SignalRequest",
    "View",
    "get_method",
    "method_names",
    "register",
]
