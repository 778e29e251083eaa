"""Guarded access to Triton: importing :mod:`prune.kernels` never imports Triton.

Triton decides at *its own* import whether its standard library (``tl.sum``, ``tl.max``, ...) is
compiled or interpreted: that follows ``TRITON_INTERPRET=1`` in the environment at that moment.
Our kernels must be built in the same mode, so :func:`jit` looks at the standard library rather
than at the environment (which may have changed since).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def triton_importable() -> bool:
    """True when ``import triton`` works (False e.g. on macOS or CPU-only installs without it)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


def interpret_mode() -> bool:
    """True when Triton was imported with ``TRITON_INTERPRET=1`` (kernels run on the CPU via numpy).

    Imports Triton if needed (so the answer is fixed from then on); False when Triton is missing.
    """
    if not triton_importable():
        return False
    import triton.language as tl

    return type(tl.sum).__name__ == "InterpretedFunction"


def jit(fn):
    """``triton.jit`` in the mode Triton's own standard library was built in (compiled or interpreted)."""
    if interpret_mode():
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)


def use_triton(*tensors: torch.Tensor) -> bool:
    """Dispatch rule shared by every kernel: Triton iff all tensors are on a CUDA (or ROCm) device,
    Triton imports. (No environment switch: call the ``*_reference`` function to bypass Triton.)"""
    if not tensors or not all(t.is_cuda for t in tensors):
        return False
    return triton_importable()


def check_runnable(t: torch.Tensor, name: str) -> None:
    """Raise a clear error when the explicit Triton path cannot run on ``t``'s device."""
    if not triton_importable():
        raise RuntimeError(f"{name}: Triton is not installed; use the reference (or the dispatcher)")
    if not t.is_cuda and not interpret_mode():
        raise RuntimeError(
            f"{name}: tensors are on {t.device}; the Triton path on CPU needs TRITON_INTERPRET=1 "
            "set in the environment before triton is first imported"
        )


def cdiv(a: int, b: int) -> int:
    """Ceiling division of Python ints (``triton.cdiv`` is much slower to call from the host)."""
    return -(-a // b)


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@functools.cache
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(t: torch.Tensor) -> int:
    """Multiprocessors of ``t``'s GPU (a nominal 8 for CPU tensors in interpret mode)."""
    if not t.is_cuda:
        return 8
    return sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
