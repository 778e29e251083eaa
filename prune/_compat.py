"""Version-proof seams into transformers.

transformers renames its internal keywords every few releases (5.24: ``past_key_values`` ->
``cache`` in every forward, in ``generate``'s model inputs and in ``create_causal_mask``; the old
name stays as a deprecation shim until 5.40). prune observes the calls transformers makes
internally, so it must never look for an argument by the name a release uses. Everything here
finds things by what they are: a cache is an instance of ``transformers.Cache``; a parameter that
takes one is the parameter annotated with ``Cache`` in the callee's signature.
"""

from __future__ import annotations

import functools
import inspect
import re
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Cache

#: the transformers releases the test suite runs against (CI runs both ends); pyproject.toml's
#: ``[tool.prune]`` table and its dependency bound say the same, and a test keeps them equal
TESTED_TRANSFORMERS = ("5.17.0", "5.25.0")

#: distribution -> (oldest, newest) release tested; the newest's patch releases count as tested.
#: Python and torch: the GPU machine (torch 2.11) and CI (torch 2.14); lmms-eval 0.7.3 is the newest.
TESTED = {
    "python": ("3.10", "3.11"),
    "torch": ("2.11.0", "2.14.1"),
    "transformers": TESTED_TRANSFORMERS,
    "triton": ("3.6.0", "3.8.0"),
    "lmms-eval": ("0.7.3", "0.7.3"),
    "decord": ("0.6.0", "0.6.0"),
}

#: names a cache parameter had in the releases prune knows, newest first; used only when a signature
#: carries no annotation to read
_CACHE_NAMES = ("cache", "past_key_values")


def is_cache(value: Any) -> bool:
    """A transformers ``Cache`` or a legacy tuple cache (per layer, a (key, value) pair of 4-D tensors)."""
    if isinstance(value, Cache):
        return True
    return (
        isinstance(value, tuple | list)
        and len(value) > 0
        and all(isinstance(layer, tuple | list) and len(layer) >= 2 for layer in value)
        and all(isinstance(t, torch.Tensor) and t.ndim == 4 for t in value[0][:2])
    )


def find_cache(values: Mapping[str, Any]) -> Any:
    """The cache among a call's keyword arguments or a model output's fields (None if there is none)."""
    items = list(values.values())
    for value in items:
        if isinstance(value, Cache):
            return value
    for value in items:
        if is_cache(value):
            return value
    return None


def cache_length(cache: Any) -> int:
    """Tokens a cache holds (0 for None)."""
    if cache is None:
        return 0
    if isinstance(cache, Cache):
        return int(cache.get_seq_length())
    return int(cache[0][0].shape[-2])  # legacy tuple


def is_static_cache(cache: Any) -> bool:
    """A cache of fixed-size buffers built for ``torch.compile`` (``StaticCache``): its length is a
    device tensor and the masks transformers builds for it span its whole capacity."""
    return isinstance(cache, Cache) and bool(cache.is_compileable)


def past_length(kwargs: Mapping[str, Any]) -> int:
    """Tokens already cached before this call, read from the cache among its arguments."""
    return cache_length(find_cache(kwargs))


@functools.lru_cache(maxsize=512)
def _cache_parameter(fn) -> str | None:
    try:
        params = inspect.signature(fn).parameters  # follows functools.wraps (deprecation shims)
    except (TypeError, ValueError):
        return None
    for name, param in params.items():
        annotation = param.annotation
        if annotation is inspect.Parameter.empty or name == "use_cache":
            continue
        text = annotation if isinstance(annotation, str) else str(annotation)
        if re.search(r"\bCache\b", text):  # "Cache | None", "transformers.cache_utils.Cache | None"
            return name
    for name in _CACHE_NAMES:
        if name in params:
            return name
    return None


@torch.compiler.assume_constant_result
def cache_parameter(fn) -> str:
    """The name of the parameter of ``fn`` that takes the KV cache (read from its signature).

    A constant to ``torch.compile``: dynamo does not trace the signature's inspection (transformers'
    deprecation shims give functions a ``__signature__`` whose dict dynamo refuses to read), it calls
    this once while tracing and bakes in the name."""
    name = _cache_parameter(getattr(fn, "__func__", fn))
    if name is None:
        raise TypeError(f"{getattr(fn, '__qualname__', fn)} takes no cache argument")
    return name


def with_cache(fn, cache: Any, **kwargs: Any) -> dict[str, Any]:
    """``kwargs`` plus the cache under the name ``fn``'s signature gives it."""
    return {**kwargs, cache_parameter(fn): cache}


def call_with_cache(fn, cache: Any, /, **kwargs: Any):
    """Call ``fn(**kwargs)`` passing ``cache`` under whatever name ``fn`` takes it."""
    return fn(**with_cache(fn, cache, **kwargs))


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def _release(version: str) -> tuple[int, ...]:
    """(major, minor, patch); a pre-release counts as the release it leads to."""
    from packaging.version import Version

    return (*Version(version).release, 0, 0)[:3]


def in_tested_range(version: str, tested: tuple[str, str] = TESTED_TRANSFORMERS) -> bool:
    """Whether a version lies inside a tested range (patch releases of the newest count)."""
    low, high = (_release(v) for v in tested)
    release = _release(version.split("+")[0])  # 2.14.1+cu130
    return low <= release and release[:2] <= high[:2]


def environment() -> list[dict[str, Any]]:
    """What a bug report needs: each package's version (None if absent), its tested range, whether
    it is inside it, and the device."""
    import platform
    from importlib import metadata

    import prune

    rows: list[dict[str, Any]] = [{"name": "prune", "version": prune.__version__, "tested": None, "ok": None}]
    for name, tested in TESTED.items():
        if name == "python":
            version = platform.python_version()
        else:
            try:
                version = metadata.version(name)
            except metadata.PackageNotFoundError:
                version = None
        ok = None if version is None else in_tested_range(version, tested)
        rows.append({"name": name, "version": version, "tested": f"{tested[0]} .. {tested[1]}", "ok": ok})
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()}), CUDA {torch.version.cuda}"
    else:
        device = "cpu (no CUDA device)"
    rows.append({"name": "device", "version": device, "tested": None, "ok": None})
    return rows


_warned_versions: set[str] = set()


def warn_if_untested() -> None:
    """Warn once per process and version when the installed transformers is outside the tested range."""
    version = transformers_version()
    if version in _warned_versions or in_tested_range(version):
        return
    _warned_versions.add(version)
    low, high = TESTED_TRANSFORMERS
    warnings.warn(
        f"prune is tested with transformers {low} to {high}.x; {version} is installed. It may work, but "
        "outputs are not checked on this release: run `prune env` and report problems with its output.",
        UserWarning,
        stacklevel=3,
    )
