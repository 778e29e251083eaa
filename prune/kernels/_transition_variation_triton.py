"""Triton kernel for :func:`prune.kernels.transition_variation` (imported lazily: needs Triton)."""

from __future__ import annotations

import torch
import triton.language as tl

from ._triton_support import cdiv as _cdiv
from ._triton_support import jit, next_pow2


def _transition_kernel(
    HB, HA, RATIO, VAR,
    s_bb, s_bn, s_bd,
    s_ab, s_an, s_ad,
    ROWS, N, D, eps,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < ROWS
    bi = (r // N).to(tl.int64)
    ni = (r % N).to(tl.int64)
    b_row = HB + (bi * s_bb + ni * s_bn)[:, None]
    a_row = HA + (bi * s_ab + ni * s_an)[:, None]
    acc_bb = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    acc_aa = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    acc_ab = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        m = r_ok[:, None] & (dd < D)[None, :]
        hb = tl.load(b_row + dd[None, :] * s_bd, mask=m, other=0.0).to(tl.float32)
        ha = tl.load(a_row + dd[None, :] * s_ad, mask=m, other=0.0).to(tl.float32)
        acc_bb += hb * hb
        acc_aa += ha * ha
        acc_ab += hb * ha
    nb = tl.sqrt(tl.sum(acc_bb, 1))
    na = tl.sqrt(tl.sum(acc_aa, 1))
    dot = tl.sum(acc_ab, 1)
    nb_c = tl.maximum(nb, eps)
    ratio = na / nb_c
    var = 1.0 - dot / (nb_c * tl.maximum(na, eps))
    var = tl.minimum(tl.maximum(var, 0.0), 2.0)
    tl.store(RATIO + r, ratio, mask=r_ok)
    tl.store(VAR + r, var, mask=r_ok)


_transition_kernel = jit(_transition_kernel)


def launch(h_before: torch.Tensor, h_after: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, d = h_before.shape
    rows = b * n
    ratio = torch.empty((b, n), dtype=torch.float32, device=h_before.device)
    var = torch.empty((b, n), dtype=torch.float32, device=h_before.device)
    block_d = min(next_pow2(max(d, 1)), 512)
    block_r = max(1, min(16, 2048 // block_d))
    if not h_before.is_cuda:
        block_d, block_r = min(block_d, 16), min(block_r, 4)
    grid = (_cdiv(rows, block_r),)
    _transition_kernel[grid](
        h_before, h_after, ratio, var,
        *h_before.stride(), *h_after.stride(),
        rows, n, d, eps,
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4,
    )  # fmt: skip
    return ratio, var
