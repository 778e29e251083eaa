"""Triton row gather for :func:`prune.kernels.topk_gather` (imported lazily: needs Triton)."""

from __future__ import annotations

import torch
import triton.language as tl

from ._triton_support import cdiv as _cdiv
from ._triton_support import jit, next_pow2


def _gather_kernel(
    X, IDX, OUT,
    s_xb, s_xn, s_xd,
    ROWS, K, D,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """OUT[r, :] = X[r // K, IDX[r], :] for the (B*K) output rows r, zeros where IDX[r] < 0."""
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < ROWS
    src = tl.load(IDX + r, mask=r_ok, other=-1)
    ok = r_ok & (src >= 0)
    b = r // K
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = dd < D
    src_off = b.to(tl.int64) * s_xb + tl.where(ok, src, 0).to(tl.int64) * s_xn
    vals = tl.load(X + src_off[:, None] + dd[None, :] * s_xd, mask=ok[:, None] & d_ok[None, :], other=0)
    out_off = r.to(tl.int64)[:, None] * D + dd[None, :]
    tl.store(OUT + out_off, vals, mask=r_ok[:, None] & d_ok[None, :])


_gather_kernel = jit(_gather_kernel)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(B, K, D) contiguous rows ``x[b, idx[b, j]]`` (zeros where ``idx < 0``); idx (B, K) int64."""
    b, _, d = x.shape
    kk = idx.shape[1]
    out_dtype = x.dtype
    if x.dtype == torch.bool:  # Triton has no bool pointers of torch's layout: move bytes
        x = x.view(torch.uint8)
    out = torch.empty((b, kk, d), dtype=x.dtype, device=x.device)
    rows = b * kk
    block_d = min(next_pow2(d), max(16, 4096 // x.element_size() // 4))  # <= 1 KiB a row chunk
    block_r = max(1, min(32, 4096 // block_d))
    if not x.is_cuda:
        block_d, block_r = min(block_d, 32), min(block_r, 8)
    grid = (_cdiv(rows, block_r), _cdiv(d, block_d))
    _gather_kernel[grid](
        x, idx.contiguous(), out, *x.stride(), rows, kk, d,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return out.view(out_dtype) if out_dtype == torch.bool else out
