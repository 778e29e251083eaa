"""Token transition variation: how much each token's hidden state changes across a layer.

:func:`transition_variation_reference` (plain torch) defines the semantics, :func:`transition_variation_triton`
reads each tensor once in one Triton kernel (``_transition_variation_triton.py``, imported lazily),
:func:`transition_variation` dispatches.

Zero-vector convention (``EPS = 1e-8``, as in ``torch.nn.functional.cosine_similarity``): norms in
denominators are clamped to at least ``EPS``, so

* ``ratio = ||after|| / max(||before||, EPS)``: 0 when ``after`` is zero (also when both are), and
  ``||after|| / EPS`` (large) when only ``before`` is zero;
* ``variation = 1 - (before . after) / (max(||before||, EPS) * max(||after||, EPS))``, clamped to
  [0, 2]: exactly 1 when either vector is zero (cosine 0), never NaN for finite inputs.
"""

from __future__ import annotations

import contextlib

import torch

EPS = 1e-8


def _check_inputs(h_before: torch.Tensor, h_after: torch.Tensor) -> None:
    if h_before.ndim != 3 or h_before.shape != h_after.shape:
        raise ValueError(
            f"h_before and h_after must both be (B, N, D) of one shape; got {tuple(h_before.shape)} "
            f"and {tuple(h_after.shape)}"
        )
    if h_before.device != h_after.device:
        raise ValueError(f"inputs must be on one device; got {h_before.device} and {h_after.device}")
    for t in (h_before, h_after):
        if not t.is_floating_point():
            raise TypeError(f"hidden states must be floating point; got {t.dtype}")


def transition_variation_reference(
    h_before: torch.Tensor, h_after: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token norm ratio and cosine variation between two hidden states.

    Args:
        h_before: (B, N, D) hidden states entering a layer.
        h_after: (B, N, D) hidden states leaving it (same shape; any float dtypes, any strides).

    Returns:
        ``(ratio, variation)``, two (B, N) float32 tensors: ``||h_after|| / ||h_before||`` and
        ``1 - cos(h_before, h_after)`` in [0, 2], computed in fp32 with the zero-vector convention of
        the module docstring.
    """
    _check_inputs(h_before, h_after)
    hb = h_before.float()
    ha = h_after.float()
    nb = torch.linalg.vector_norm(hb, dim=-1)
    na = torch.linalg.vector_norm(ha, dim=-1)
    dot = (hb * ha).sum(dim=-1)
    nb_c = nb.clamp_min(EPS)
    ratio = na / nb_c
    variation = (1.0 - dot / (nb_c * na.clamp_min(EPS))).clamp(0.0, 2.0)
    return ratio, variation


def transition_variation_triton(
    h_before: torch.Tensor, h_after: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`transition_variation_reference` (same arguments, same result).

    One kernel, one read of each input (through its strides): per row it accumulates in fp32 the
    three sums ``b.b``, ``a.a``, ``a.b`` and writes both outputs.
    """
    from ._triton_support import check_runnable

    _check_inputs(h_before, h_after)
    check_runnable(h_before, "transition_variation_triton")
    b, n, d = h_before.shape
    if b * n == 0:
        empty = torch.zeros((b, n), dtype=torch.float32, device=h_before.device)
        return empty, empty.clone()
    from ._transition_variation_triton import launch

    with torch.cuda.device(h_before.device) if h_before.is_cuda else contextlib.nullcontext():
        return launch(h_before.detach(), h_after.detach(), EPS)


def transition_variation(h_before: torch.Tensor, h_after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio, 1 - cosine) per token, fp32 (B, N); see :func:`transition_variation_reference`.

    Dispatch: :func:`transition_variation_triton` when both are CUDA tensors and Triton imports, :func:`transition_variation_reference` otherwise.
    """
    from ._triton_support import use_triton

    if use_triton(h_before, h_after):
        return transition_variation_triton(h_before, h_after)
    return transition_variation_reference(h_before, h_after)
