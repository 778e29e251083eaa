"""Per-row top-k with stable ties, indices re-sorted ascending, fused with the row gather.

:func:`topk_gather_reference` (plain torch: a stable descending sort) defines the semantics,
:func:`topk_gather_triton` selects with ``torch.topk`` on collision-free integer keys and gathers with
a Triton kernel (``_topk_gather_triton.py``, imported lazily), :func:`topk_gather` dispatches.
"""

from __future__ import annotations

import contextlib
import operator

import torch

_INT32_MAX = 2**31 - 1


def _check_inputs(x: torch.Tensor, scores: torch.Tensor) -> tuple[int, int, int]:
    if x.ndim != 3 or scores.ndim != 2:
        raise ValueError(
            f"x must be (B, N, D) and scores (B, N); got {tuple(x.shape)} and {tuple(scores.shape)}"
        )
    b, n, d = x.shape
    if tuple(scores.shape) != (b, n):
        raise ValueError(f"scores {tuple(scores.shape)} must be (B, N) = {(b, n)}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise TypeError(f"scores must be real numbers; got {scores.dtype}")
    if scores.device != x.device:
        raise ValueError(f"x and scores must be on the same device; got {x.device} and {scores.device}")
    return b, n, d


def _normalize_k(k, b: int, n: int, device: torch.device) -> tuple[int, torch.Tensor | None]:
    """Return (max k, per-row k as a (B,) long tensor on ``device`` or None when k is one number)."""
    if isinstance(k, torch.Tensor) and k.ndim > 0:
        if k.ndim != 1 or k.shape[0] != b:
            raise ValueError(f"a per-row k must be a (B,) = ({b},) tensor; got shape {tuple(k.shape)}")
        if k.is_floating_point() or k.is_complex() or k.dtype == torch.bool:
            raise TypeError(f"k must hold integers; got {k.dtype}")
        if b == 0:
            return 0, k.to(device=device, dtype=torch.long)
        lo, hi = (int(v) for v in torch.stack([k.min(), k.max()]).tolist())  # one host sync
        if lo < 0 or hi > n:
            raise ValueError(f"per-row k values must lie in [0, N={n}]; got [{lo}, {hi}]")
        return hi, k.to(device=device, dtype=torch.long)
    if isinstance(k, torch.Tensor):
        if k.is_floating_point() or k.is_complex():
            raise TypeError(f"k must be an integer; got {k.dtype}")
        k = int(k.item())
    if isinstance(k, bool):
        raise TypeError("k must be an int or a (B,) integer tensor; got bool")
    try:
        k = operator.index(k)
    except TypeError as exc:
        raise TypeError(f"k must be an int or a (B,) integer tensor; got {type(k).__name__}") from exc
    if k < 0 or k > n:
        raise ValueError(f"k must lie in [0, N={n}]; got {k}")
    return k, None


def _finish_indices(
    order: torch.Tensor, kvec: torch.Tensor | None, n: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """From (B, kmax) rank-ordered indices to ascending indices (-1 past each row's k) and a valid mask."""
    if kvec is None:
        return order.sort(dim=1).values, None
    kmax = order.shape[1]
    valid = torch.arange(kmax, device=order.device)[None, :] < kvec[:, None]
    idx = torch.where(valid, order, torch.full_like(order, n)).sort(dim=1).values
    valid_sorted = idx < n
    return torch.where(valid_sorted, idx, torch.full_like(idx, -1)), valid_sorted


def _stable_descending_order(scores: torch.Tensor) -> torch.Tensor:
    """(B, N) indices by descending score, lower index first among ties, NaN above +inf, -0.0 == +0.0.

    Spelled out rather than left to ``torch.sort``, whose NaN placement differs between devices and
    dtypes (seen: bf16 on CUDA).
    """
    if not scores.is_floating_point():
        return torch.sort(scores, dim=1, descending=True, stable=True).indices
    nan = torch.isnan(scores)
    s = torch.where(nan, torch.full_like(scores, float("inf")), scores + 0.0)  # + 0.0: -0.0 -> +0.0
    order = torch.sort(s, dim=1, descending=True, stable=True).indices
    # NaNs tie with +inf so far; a second stable sort on "is NaN" moves them ahead, order kept
    first = torch.sort(nan.gather(1, order).to(torch.uint8), dim=1, descending=True, stable=True).indices
    return order.gather(1, first)


def topk_gather_reference(
    x: torch.Tensor, scores: torch.Tensor, k: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep, per row, the ``k`` highest-scoring tokens of ``x`` in their original order.

    Args:
        x: (B, N, D) tokens (any dtype, any strides).
        scores: (B, N) real scores; higher is kept. Ties: the lower index wins. NaN ranks above +inf
            (on every device and dtype); -0.0 and +0.0 tie.
        k: an int in [0, N], or a (B,) integer tensor of per-row counts (ragged).

    Returns:
        ``(gathered, indices)``: ``gathered`` a contiguous (B, K, D) tensor of x's dtype, ``indices``
        (B, K) int64 ascending, where K = k (or max k when ragged); in a ragged row b, positions
        ``>= k[b]`` hold index -1 and zero rows.
    """
    b, n, d = _check_inputs(x, scores)
    kmax, kvec = _normalize_k(k, b, n, x.device)
    order = _stable_descending_order(scores)[:, :kmax]
    idx, valid = _finish_indices(order, kvec, n)
    gathered = torch.gather(x, 1, idx.clamp_min(0)[:, :, None].expand(b, kmax, d))
    if valid is not None:
        gathered = gathered.masked_fill(~valid[:, :, None], 0)
    return gathered.contiguous(), idx


def _rank_order(scores: torch.Tensor, kmax: int, ranked: bool) -> torch.Tensor:
    """(B, kmax) indices of the top-kmax scores (stable ties); in rank order when ``ranked``.

    fp16 / bf16 / fp32 scores: each score becomes a unique int64 key, (order-preserving int32 image of
    the fp32 score) * 2**32 + (N - 1 - index), so one ``torch.topk`` (O(N), not a sort) gives exactly
    the stable-tie selection. Other dtypes: a stable sort.
    """
    n = scores.shape[1]
    if scores.dtype in (torch.float16, torch.bfloat16, torch.float32) and n < _INT32_MAX:
        s = scores.float() + 0.0  # -0.0 -> +0.0, so that they tie
        bits = s.view(torch.int32)
        key = torch.where(bits < 0, bits ^ _INT32_MAX, bits)  # monotone in the float value
        key = torch.where(torch.isnan(s), torch.full_like(key, _INT32_MAX), key)  # NaN above +inf
        tie = (n - 1) - torch.arange(n, device=scores.device, dtype=torch.int64)
        comp = key.to(torch.int64) * (1 << 32) + tie
        return torch.topk(comp, kmax, dim=1, largest=True, sorted=ranked).indices
    return _stable_descending_order(scores)[:, :kmax]


def topk_gather_triton(
    x: torch.Tensor, scores: torch.Tensor, k: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`topk_gather_reference` (same arguments, same result).

    The selection runs in torch (``torch.topk`` on collision-free int64 keys for fp16/bf16/fp32
    scores, a stable sort otherwise; a Triton top-k is not worth it at N <= 32k) followed by an
    ascending sort of the k indices; the row gather into the contiguous (B, K, D) output, with the
    zero fill of ragged rows, is one Triton kernel reading x through its strides. A ragged k needs
    one host sync (to size the output).
    """
    from ._triton_support import check_runnable

    b, n, d = _check_inputs(x, scores)
    check_runnable(x, "topk_gather_triton")
    kmax, kvec = _normalize_k(k, b, n, x.device)
    order = _rank_order(scores, kmax, ranked=kvec is not None)
    idx, _ = _finish_indices(order, kvec, n)
    if b * kmax * d == 0:
        return x.new_zeros((b, kmax, d)), idx

    from ._topk_gather_triton import gather_rows

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        return gather_rows(x.detach(), idx), idx


def topk_gather(
    x: torch.Tensor, scores: torch.Tensor, k: int | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k tokens per row, kept in order; see :func:`topk_gather_reference` for semantics.

    Dispatch: :func:`topk_gather_triton` when x and scores are CUDA tensors and Triton imports, :func:`topk_gather_reference` otherwise.
    """
    from ._triton_support import use_triton

    if use_triton(x, scores) and not x.is_complex():
        return topk_gather_triton(x, scores, k)
    return topk_gather_reference(x, scores, k)
