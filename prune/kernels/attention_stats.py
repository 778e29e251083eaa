"""Per-key attention statistics from Q and K without an N x N buffer.

:func:`attention_stats_reference` is the plain-torch reference (it defines the semantics),
:func:`attention_stats_triton` the Triton path (kernels in ``_attention_stats_triton.py``, imported
lazily), and :func:`attention_stats` the dispatcher between the two.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

# Largest number of attention logits materialized at once per call (B * H * rows * keys).
_CHUNK_ELEMENTS = 1 << 24


def _normalize_query_index(query_index: torch.Tensor | None, batch: int, n: int, device) -> torch.Tensor:
    """Return query rows as a (B, Q) long tensor."""
    if query_index is None:
        return torch.arange(n, device=device).expand(batch, n)
    query_index = torch.as_tensor(query_index, device=device).long()
    if query_index.ndim == 0:
        query_index = query_index.view(1)
    if query_index.ndim == 1:
        query_index = query_index.expand(batch, -1)
    if query_index.ndim != 2 or query_index.shape[0] != batch:
        raise ValueError(f"query_index must have shape (Q,) or (B, Q); got {tuple(query_index.shape)}")
    # checked where it is free (on the host); on a GPU the gather asserts, and reading the range
    # back would make the host wait for the device
    if query_index.numel() and query_index.device.type == "cpu" and (query_index.min() < 0 or query_index.max() >= n):
        raise ValueError(f"query_index values must lie in [0, {n - 1}]")
    return query_index


def _check_shapes(q: torch.Tensor, k: torch.Tensor) -> tuple[int, int, int, int, int]:
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be (B, H, N, d); got {tuple(q.shape)} and {tuple(k.shape)}")
    b, h, n, d = q.shape
    bk, hk, nk, dk = k.shape
    if (bk, nk, dk) != (b, n, d):
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on B, N and d")
    if h % hk != 0:
        raise ValueError(f"q heads ({h}) must be a multiple of k heads ({hk}) for grouped-query attention")
    return b, h, n, d, hk


def _segment_bounds(segments: torch.Tensor | None, n: int) -> list[tuple[int, int]]:
    if segments is None:
        return [(0, n)]
    cu = [int(x) for x in torch.as_tensor(segments).tolist()]
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"segments must be cumulative lengths from 0 to N={n}; got {cu[:8]}...")
    return [(a, b) for a, b in zip(cu, cu[1:], strict=False) if b > a]


def attention_stats_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    query_index: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """Attention each key receives, averaged over heads and over the chosen query rows.

    Args:
        q: (B, H, N, d) queries (post-RoPE where the layer uses RoPE).
        k: (B, Hk, N, d) keys; ``H % Hk == 0`` (grouped-query attention repeats each k head).
        query_index: None for every row, or (Q,) / (B, Q) row indices whose attention is averaged.
        segments: optional cumulative lengths (S+1,) of block-diagonal windows (cu_seqlens); softmax
            is taken inside each window and a query only attends to keys of its own window.
        scale: logit scale, ``d ** -0.5`` when None.
        key_mask: optional (B, N) bool; False keys (padding) take part in no softmax.
        causal: query i only attends to keys j <= i (a decoder layer's own attention).

    Returns:
        (B, N) float32: ``sum_{h, i in rows} softmax(q_i k^T * scale)[j] / (H * Q)``.
    """
    b, h, n, d, hk = _check_shapes(q, k)
    scale = d**-0.5 if scale is None else float(scale)
    rows = _normalize_query_index(query_index, b, n, q.device)
    num_rows = rows.shape[1]
    out = torch.zeros(b, n, dtype=torch.float32, device=q.device)
    if num_rows == 0:
        return out
    groups = h // hk
    if segments is None and b * h * num_rows * n <= _CHUNK_ELEMENTS:
        # A few rows (a decoder layer's last token, a [CLS] row): one batched product, no loops.
        q_rows = torch.gather(q, 2, rows[:, None, :, None].expand(b, h, num_rows, d)).float()  # (B, H, Q, d)
        keys = k.float().repeat_interleave(groups, dim=1) if groups > 1 else k.float()
        logits = torch.einsum("bhqd,bhkd->bhqk", q_rows, keys) * scale  # (B, H, Q, N)
        if key_mask is not None or causal:
            allowed = torch.ones(b, 1, num_rows, n, dtype=torch.bool, device=q.device)
            if key_mask is not None:
                allowed = allowed & key_mask.bool()[:, None, None, :]
            if causal:
                allowed = allowed & (torch.arange(n, device=q.device)[None, None, None, :] <= rows[:, None, :, None])
            logits = logits.masked_fill(~allowed, float("-inf"))
        return logits.softmax(dim=-1).nan_to_num(0.0).sum(dim=(1, 2)) / (h * num_rows)
    for start, end in _segment_bounds(segments, n):
        k_seg = k[:, :, start:end].float()
        if groups > 1:
            k_seg = k_seg.repeat_interleave(groups, dim=1)  # (B, H, n_seg, d)
        for bi in range(b):
            seg_rows = rows[bi][(rows[bi] >= start) & (rows[bi] < end)]
            if seg_rows.numel() == 0:
                continue
            chunk = max(1, _CHUNK_ELEMENTS // (h * (end - start)))
            for c in range(0, seg_rows.numel(), chunk):
                r = seg_rows[c : c + chunk]
                logits = (
                    torch.einsum("hqd,hkd->hqk", q[bi, :, r].float(), k_seg[bi]) * scale
                )  # (H, Qc, n_seg)
                if key_mask is not None or causal:
                    allowed = torch.ones(r.numel(), end - start, dtype=torch.bool, device=q.device)
                    if key_mask is not None:
                        allowed &= key_mask[bi, start:end].bool()[None, :]
                    if causal:
                        allowed &= torch.arange(start, end, device=q.device)[None, :] <= r[:, None]
                    logits = logits.masked_fill(~allowed, float("-inf"))
                probs = logits.softmax(dim=-1).nan_to_num(0.0)  # a row with no allowed key adds nothing
                out[bi, start:end] += probs.sum(dim=(0, 1))
    return out / (h * num_rows)


# --------------------------------------------------------------------------------------------------
# Triton path and dispatcher
# --------------------------------------------------------------------------------------------------


def _assert_async(cond: torch.Tensor, msg: str) -> None:
    """Device-side check without a host sync (a failure surfaces as a CUDA device-side assert)."""
    try:
        torch._assert_async(cond, msg)
    except TypeError:  # older signature without a message
        torch._assert_async(cond)


# Device copies of small host-resident index data (query rows, segment bounds), keyed by content:
# a repeated call (the CLS row of every layer, the same windows every layer) then needs no
# host-to-device copy, so it neither waits for the GPU nor blocks CUDA-graph capture.
_DEVICE_CACHE: OrderedDict = OrderedDict()
_DEVICE_CACHE_SIZE = 256
_CACHEABLE_MAX = 1 << 16


def _content_key(obj):
    """Hashable content of small host-resident integer index data, or None (then nothing is cached)."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type != "cpu" or obj.numel() > _CACHEABLE_MAX or obj.is_floating_point():
            return None
        if obj.is_complex() or obj.dtype == torch.bool:
            return None
        return ("tensor", str(obj.dtype), tuple(obj.shape), obj.contiguous().numpy().tobytes())
    if type(obj) is int:
        return ("int", obj)
    if isinstance(obj, (list, tuple)) and len(obj) <= _CACHEABLE_MAX:
        if all(type(v) is int for v in obj):
            return ("list", tuple(obj))
        if all(isinstance(r, (list, tuple)) and all(type(v) is int for v in r) for r in obj):
            return ("list2", tuple(tuple(r) for r in obj))
    return None


def _cached(key, build):
    if key is None:
        return build()
    hit = _DEVICE_CACHE.get(key)
    if hit is not None:
        _DEVICE_CACHE.move_to_end(key)
        return hit
    value = build()
    _DEVICE_CACHE[key] = value
    while len(_DEVICE_CACHE) > _DEVICE_CACHE_SIZE:
        _DEVICE_CACHE.popitem(last=False)
    return value


def _upload(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor to ``device`` without waiting for the GPU (through pinned memory)."""
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def _query_rows_for_kernel(query_index, b: int, n: int, device: torch.device) -> torch.Tensor:
    """(B, Q) int32 contiguous row indices on ``device``.

    Host-resident indices (ints, lists, CPU tensors) are validated on the host (ValueError) and their
    device copy is cached by content. Indices that already live on the GPU are range-checked with
    ``torch._assert_async`` instead, so that no host sync is needed (a bad index then raises a
    device-side assert at the next synchronization).
    """
    if isinstance(query_index, torch.Tensor) and query_index.device.type != "cpu":
        qi = query_index.to(device=device)
        if qi.ndim == 0:
            qi = qi.view(1)
        if qi.ndim == 1:
            qi = qi.expand(b, -1)
        if qi.ndim != 2 or qi.shape[0] != b:
            raise ValueError(f"query_index must have shape (Q,) or (B, Q); got {tuple(query_index.shape)}")
        if qi.is_floating_point():
            qi = qi.long()
        if qi.numel():
            _assert_async(((qi >= 0) & (qi < n)).all(), f"query_index values must lie in [0, {n - 1}]")
        return qi.to(torch.int32).contiguous()

    def build():
        rows = _normalize_query_index(query_index, b, n, torch.device("cpu"))
        return _upload(rows.to(torch.int32).contiguous(), device)

    key = _content_key(query_index)
    return _cached(None if key is None else ("rows", b, n, str(device), key), build)


def _segment_arrays(segments, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-token segment bounds (lo, hi) as (N,) int32 on ``device``; None when there is one segment."""
    if segments is None:
        return None
    if isinstance(segments, torch.Tensor) and segments.device.type != "cpu":
        seg = segments
        if seg.ndim != 1 or seg.numel() < 2:
            raise ValueError(
                f"segments must be a 1-D tensor of cumulative lengths; got shape {tuple(seg.shape)}"
            )
        cu = seg.to(device=device, dtype=torch.int64)
        ok = (cu[0] == 0) & (cu[-1] == n) & (cu[1:] >= cu[:-1]).all()
        _assert_async(ok, f"segments must be non-decreasing cumulative lengths from 0 to N={n}")
        return segment_bounds(cu, n)

    def build():
        bounds = _segment_bounds(segments, n)  # validates on the host
        if len(bounds) <= 1:
            return None
        lo = torch.empty(n, dtype=torch.int32)
        hi = torch.empty(n, dtype=torch.int32)
        for a, e in bounds:
            lo[a:e] = a
            hi[a:e] = e
        return _upload(lo, device), _upload(hi, device)

    key = _content_key(segments)
    return _cached(None if key is None else ("segments", n, str(device), key), build)


def segment_bounds(cu: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) (n,) int32 on ``cu``'s device: the bounds of the segment (``cu_seqlens`` window) each
    of the ``n`` rows lies in; no synchronisation."""
    seg_id = torch.searchsorted(cu[1:].contiguous(), torch.arange(n, device=cu.device), right=True)
    return cu[seg_id].to(torch.int32), cu[seg_id + 1].to(torch.int32)


def attention_stats_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    query_index: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    scale: float | None = None,
    config=None,
) -> torch.Tensor:
    """Triton version of :func:`attention_stats_reference` (same arguments, same result).

    Runs on CUDA tensors, or on CPU tensors when Triton was imported with ``TRITON_INTERPRET=1``.
    Two kernels (row log-sum-exp, then column sums; see ``_attention_stats_triton``), fp32
    accumulation, O(B*H*N) memory. fp16 / bf16 / fp32 inputs are used as they are (fp32 dots in
    IEEE precision, not tf32); other dtypes, or q and k of different dtypes, are cast to fp32.
    Any strides, any N, any head dim (split into power-of-two chunks), grouped-query attention.
    ``config`` (an ``AttentionConfig``) overrides the launch heuristics (tests, tuning).
    No autograd: the result carries no gradient.
    """
    from ._triton_support import check_runnable

    b, h, n, d, _ = _check_shapes(q, k)
    check_runnable(q, "attention_stats_triton")
    if q.device != k.device:
        raise ValueError(f"q and k must be on the same device; got {q.device} and {k.device}")
    scale = d**-0.5 if scale is None else float(scale)
    idx = None if query_index is None else _query_rows_for_kernel(query_index, b, n, q.device)
    seg = _segment_arrays(segments, n, q.device)
    num_rows = n if idx is None else idx.shape[1]
    if n == 0 or num_rows == 0 or b == 0:
        return torch.zeros(b, n, dtype=torch.float32, device=q.device)
    if q.dtype != k.dtype or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        q, k = q.float(), k.float()

    from ._attention_stats_triton import launch

    lo, hi = seg if seg is not None else (None, None)
    if q.is_cuda and q.device.index != torch.cuda.current_device():
        with torch.cuda.device(q.device):
            return launch(q.detach(), k.detach(), idx, lo, hi, scale, config)
    return launch(q.detach(), k.detach(), idx, lo, hi, scale, config)


def attention_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    query_index: torch.Tensor | None = None,
    segments: torch.Tensor | None = None,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    """(B, N) fp32 attention received per key; see :func:`attention_stats_reference` for semantics.

    Dispatch: :func:`attention_stats_triton` when q and k are CUDA tensors and Triton imports, :func:`attention_stats_reference` otherwise. Masked calls
    (``key_mask`` / ``causal``: a few query rows of a decoder layer) take the reference path, which
    costs O(H * Q * N) there.
    """
    from ._triton_support import use_triton

    if key_mask is not None or causal:
        return attention_stats_reference(
            q, k, query_index=query_index, segments=segments, scale=scale, key_mask=key_mask, causal=causal
        )
    if use_triton(q, k):
        return attention_stats_triton(q, k, query_index=query_index, segments=segments, scale=scale)
    return attention_stats_reference(q, k, query_index=query_index, segments=segments, scale=scale)
