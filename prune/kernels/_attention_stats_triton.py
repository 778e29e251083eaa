"""Triton kernels for :func:`prune.kernels.attention_stats` (imported lazily: needs Triton).

Two passes, never an N x N buffer:

1. ``_lse_kernel``: for each chosen query row (and head), the base-2 log-sum-exp of its scaled logits
   over the keys it may attend (its segment), with an online max. Grid (row blocks, B*H, key splits);
   with several key splits each program writes a partial (max, sum) pair and pass 2 combines them
   (flash-decoding style), so that few query rows still fill the GPU.
2. ``_colsum_kernel``: for each block of keys, ``sum_rows exp2(s * c - lse_row)`` over the query rows
   and over the q heads of a chunk of kv heads (all q heads of a kv head when GQA), accumulated in fp32
   registers. Grid (key blocks, B * kv-head chunks, row splits); each program writes one slice of a
   (chunks * row splits, B, N) partial buffer, summed afterwards (deterministic, no atomics).

Memory: O(B*H*R) for the log-sum-exp (R query rows) plus O(P*B*N) partials. Head dims that are not a
power of two are split into two power-of-two chunks (80 = 64 + 16, 72 = 64 + 16 masked) rather than
padded to the next power of two, which would waste tensor-core work.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import triton.language as tl

from ._triton_support import cdiv as _cdiv
from ._triton_support import jit, next_pow2, num_sms

_LOG2E = 1.4426950408889634


def _load_tile(ptrs, row_ok, dmask, MASK_ROWS: tl.constexpr, MASK_D: tl.constexpr, UPCAST: tl.constexpr):
    """Load a (rows, head-dim chunk) tile, masking only what needs it; fp32 in the interpreter."""
    if MASK_ROWS:
        if MASK_D:
            x = tl.load(ptrs, mask=row_ok[:, None] & dmask[None, :], other=0.0)
        else:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    else:
        if MASK_D:
            x = tl.load(ptrs, mask=dmask[None, :], other=0.0)
        else:
            x = tl.load(ptrs)
    if UPCAST:  # the interpreter's 16-bit dot is unreliable: compute it in fp32 (exact products)
        x = x.to(tl.float32)
    return x


def _lse_step(
    q1, q2, k_head, start, k_hi, s_kn, s_kd, m_i, l_i, qk_scale, lo_r, LO,
    D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, HAS_SEG: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """One key tile of the online log-sum-exp (base 2). ``qk_scale`` >= 0."""
    cols = start + tl.arange(0, BLOCK_N)
    col_ok = cols < k_hi
    offs_d1 = tl.arange(0, D1)
    k_rows = k_head + cols[:, None] * s_kn
    k1 = _load_tile(k_rows + offs_d1[None, :] * s_kd, col_ok, offs_d1 < D, MASKED, D1 > D, UPCAST)
    s = tl.dot(q1, tl.trans(k1), input_precision=PREC)
    if D2 > 0:
        offs_d2 = D1 + tl.arange(0, D2)
        k2 = _load_tile(k_rows + offs_d2[None, :] * s_kd, col_ok, offs_d2 < D, MASKED, D1 + D2 > D, UPCAST)
        s += tl.dot(q2, tl.trans(k2), input_precision=PREC)
    if HAS_SEG:
        lo_c = tl.load(LO + cols, mask=col_ok, other=-1)
        s = tl.where(lo_r[:, None] == lo_c[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    elif MASKED:  # tail tile: key mask as a -inf bias (fuses into the scaling FMA)
        s = s * qk_scale + tl.where(col_ok, 0.0, float("-inf"))[None, :]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
    else:  # full tile: max on raw logits (scale >= 0), then one FMA per element before exp2
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        p = tl.exp2(s * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i


def _lse_kernel(
    Q, K, IDX, LO, HI, M_OUT, L_OUT,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    N, R, H, GROUPS, KEYS_PER_SPLIT, BHR,
    qk_scale,
    D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_IDX: tl.constexpr, HAS_SEG: tl.constexpr, SPLIT_KEYS: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    split = tl.program_id(2)
    b = bh // H
    h = bh % H
    hk = h // GROUPS

    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_i < R
    if HAS_IDX:
        rows = tl.load(IDX + b * R + offs_i, mask=row_ok, other=0)
    else:
        rows = offs_i
    q_rows = Q + (b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh) + rows[:, None] * s_qn
    k_head = K + (b.to(tl.int64) * s_kb + hk.to(tl.int64) * s_kh)
    offs_d1 = tl.arange(0, D1)
    q1 = _load_tile(q_rows + offs_d1[None, :] * s_qd, row_ok, offs_d1 < D, True, D1 > D, UPCAST)
    if D2 > 0:
        offs_d2 = D1 + tl.arange(0, D2)
        q2 = _load_tile(q_rows + offs_d2[None, :] * s_qd, row_ok, offs_d2 < D, True, D1 + D2 > D, UPCAST)
    else:
        q2 = q1

    if HAS_SEG:
        lo_r = tl.load(LO + rows, mask=row_ok, other=N)
        hi_r = tl.load(HI + rows, mask=row_ok, other=0)
        k_lo = tl.min(lo_r, 0)
        k_hi = tl.max(hi_r, 0)
    else:
        lo_r = offs_i
        k_lo = 0
        k_hi = N
    if SPLIT_KEYS:
        k_lo = tl.maximum(k_lo, split * KEYS_PER_SPLIT)
        k_hi = tl.minimum(k_hi, split * KEYS_PER_SPLIT + KEYS_PER_SPLIT)

    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    if HAS_SEG:
        for start in range(k_lo, k_hi, BLOCK_N):
            m_i, l_i = _lse_step(
                q1, q2, k_head, start, k_hi, s_kn, s_kd, m_i, l_i, qk_scale, lo_r, LO,
                D, D1, D2, BLOCK_N, True, True, PREC, UPCAST,
            )  # fmt: skip
    else:
        k_full = k_lo + ((k_hi - k_lo) // BLOCK_N) * BLOCK_N
        for start in range(k_lo, k_full, BLOCK_N):
            m_i, l_i = _lse_step(
                q1, q2, k_head, start, k_hi, s_kn, s_kd, m_i, l_i, qk_scale, lo_r, LO,
                D, D1, D2, BLOCK_N, False, False, PREC, UPCAST,
            )  # fmt: skip
        for start in range(k_full, k_hi, BLOCK_N):  # at most one partial tile
            m_i, l_i = _lse_step(
                q1, q2, k_head, start, k_hi, s_kn, s_kd, m_i, l_i, qk_scale, lo_r, LO,
                D, D1, D2, BLOCK_N, True, False, PREC, UPCAST,
            )  # fmt: skip

    out = split * BHR + bh * R + offs_i
    if SPLIT_KEYS:
        tl.store(M_OUT + out, m_i, mask=row_ok)
        tl.store(L_OUT + out, l_i, mask=row_ok)
    else:
        tl.store(M_OUT + out, m_i + tl.log2(tl.maximum(l_i, 1.0e-30)), mask=row_ok)


def _colsum_kernel(
    Q, K, IDX, LO, HI, M_IN, L_IN, OUT,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    N, R, B, H, HK, GROUPS, KV_PER_PROG, ROWS_PER_SPLIT, BHR,
    qk_scale, inv_norm,
    D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_IDX: tl.constexpr, HAS_SEG: tl.constexpr, KSPLIT: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr, ACC2D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bc = tl.program_id(1)
    rsplit = tl.program_id(2)
    n_rsplit = tl.num_programs(2)
    n_chunks = tl.cdiv(HK, KV_PER_PROG)
    b = pid_bc // n_chunks
    chunk = pid_bc % n_chunks

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    offs_d1 = tl.arange(0, D1)
    if D2 > 0:
        offs_d2 = D1 + tl.arange(0, D2)

    r_lo = 0
    r_hi = R
    if HAS_SEG:
        lo_c = tl.load(LO + cols, mask=col_ok, other=-1)
        if not HAS_IDX:
            # all rows: only the rows of the segments these keys belong to can attend them
            r_lo = tl.min(tl.where(col_ok, lo_c, N), 0)
            r_hi = tl.max(tl.load(HI + cols, mask=col_ok, other=0), 0)
    r_lo = tl.maximum(r_lo, rsplit * ROWS_PER_SPLIT)
    r_hi = tl.minimum(r_hi, rsplit * ROWS_PER_SPLIT + ROWS_PER_SPLIT)

    acc = tl.zeros((BLOCK_N,), tl.float32)
    if ACC2D:  # accumulate the tile, reduce over rows once at the end
        acc2 = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    kv_end = tl.minimum(HK, chunk * KV_PER_PROG + KV_PER_PROG)
    for kvh in range(chunk * KV_PER_PROG, kv_end):
        k_rows = K + (b.to(tl.int64) * s_kb + tl.cast(kvh, tl.int64) * s_kh) + cols[:, None] * s_kn
        k1 = _load_tile(k_rows + offs_d1[None, :] * s_kd, col_ok, offs_d1 < D, True, D1 > D, UPCAST)
        if D2 > 0:
            k2 = _load_tile(k_rows + offs_d2[None, :] * s_kd, col_ok, offs_d2 < D, True, D1 + D2 > D, UPCAST)
        for g in range(0, GROUPS):
            h = kvh * GROUPS + g
            q_head = Q + (b.to(tl.int64) * s_qb + tl.cast(h, tl.int64) * s_qh)
            lse_base = (b * H + h) * R
            for start in range(r_lo, r_hi, BLOCK_M):
                offs_i = start + tl.arange(0, BLOCK_M)
                row_ok = offs_i < r_hi
                if HAS_IDX:
                    rows = tl.load(IDX + b * R + offs_i, mask=row_ok, other=0)
                else:
                    rows = offs_i
                q_rows = q_head + rows[:, None] * s_qn
                q1 = _load_tile(q_rows + offs_d1[None, :] * s_qd, row_ok, offs_d1 < D, True, D1 > D, UPCAST)
                s = tl.dot(k1, tl.trans(q1), input_precision=PREC)
                if D2 > 0:
                    q2 = _load_tile(
                        q_rows + offs_d2[None, :] * s_qd, row_ok, offs_d2 < D, True, D1 + D2 > D, UPCAST
                    )
                    s += tl.dot(k2, tl.trans(q2), input_precision=PREC)
                if KSPLIT == 1:
                    lse = tl.load(M_IN + lse_base + offs_i, mask=row_ok, other=float("inf"))
                else:
                    m_all = tl.full((BLOCK_M,), -1.0e30, tl.float32)
                    for sp in range(KSPLIT):
                        m_all = tl.maximum(
                            m_all, tl.load(M_IN + sp * BHR + lse_base + offs_i, mask=row_ok, other=-1.0e30)
                        )
                    l_all = tl.zeros((BLOCK_M,), tl.float32)
                    for sp in range(KSPLIT):
                        m_sp = tl.load(M_IN + sp * BHR + lse_base + offs_i, mask=row_ok, other=-1.0e30)
                        l_sp = tl.load(L_IN + sp * BHR + lse_base + offs_i, mask=row_ok, other=0.0)
                        l_all += l_sp * tl.exp2(m_sp - m_all)
                    lse = tl.where(row_ok, m_all + tl.log2(tl.maximum(l_all, 1.0e-30)), float("inf"))
                p = tl.exp2(s * qk_scale - lse[None, :])
                if HAS_SEG:
                    lo_r = tl.load(LO + rows, mask=row_ok, other=N)
                    p = tl.where(lo_c[:, None] == lo_r[None, :], p, 0.0)
                if ACC2D:
                    acc2 += p
                else:
                    acc += tl.sum(p, 1)

    if ACC2D:
        acc += tl.sum(acc2, 1)
    out = ((chunk * n_rsplit + rsplit) * B + b) * N + cols
    tl.store(OUT + out, acc * inv_norm, mask=col_ok)


_load_tile = jit(_load_tile)
_lse_step = jit(_lse_step)
_lse_kernel = jit(_lse_kernel)
_colsum_kernel = jit(_colsum_kernel)


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters (block sizes, splits, warps, pipelining) of the two passes."""

    lse_block_m: int = 64
    lse_block_n: int = 128
    lse_warps: int = 4
    lse_stages: int = 3
    key_splits: int = 1
    col_block_n: int = 128
    col_block_m: int = 64
    col_warps: int = 4
    col_stages: int = 3
    kv_per_prog: int = 1
    row_splits: int = 1
    col_acc2d: bool = False


def head_dim_chunks(d: int) -> tuple[int, int]:
    """Split ``d`` into power-of-two chunks (D1, D2), each >= 16 (tl.dot's minimum); D2 = 0 if unused."""
    if d <= 16:
        return 16, 0
    d1 = 1 << (d.bit_length() - 1)
    rem = d - d1
    return d1, (0 if rem == 0 else max(16, next_pow2(rem)))


def default_config(
    q: torch.Tensor, n: int, rows: int, hk: int, groups: int, has_idx: bool
) -> AttentionConfig:
    """Heuristic launch configuration (tuned on an H100, bf16, d = 64 / 80)."""
    sms = num_sms(q) if q.is_cuda else 0
    b, h, _, d = q.shape
    return _heuristic(q.is_cuda, sms, q.dtype == torch.float32, b, h, hk, n, d, rows, has_idx)


@functools.lru_cache(maxsize=1024)
def _heuristic(
    is_cuda: bool, sms: int, fp32: bool, b: int, h: int, hk: int, n: int, d: int, rows: int, has_idx: bool
) -> AttentionConfig:
    """Block sizes from sweeps on an H100 (bf16, H=16, d=64/80, N=4096/16384; see bench_kernels)."""
    if not is_cuda:  # interpreter: small tiles keep numpy fast and exercise the tails
        return AttentionConfig(16, 16, 1, 1, 1, 16, 16, 1, 1, 1, 1)
    if not has_idx:
        if fp32:  # ieee fp32 dots: smaller tiles, fewer registers
            cfg = AttentionConfig(64, 32, 4, 3, 1, 64, 32, 4, 3, 1, 1)
        elif head_dim_chunks(d)[1] == 0 and d <= 64:
            cfg = AttentionConfig(64, 128, 4, 3, 1, 64, 128, 4, 3, 1, 1)
        else:
            cfg = AttentionConfig(64, 128, 4, 3, 1, 128, 64, 4, 3, 1, 1)
        key_blocks = _cdiv(n, cfg.col_block_n)
        row_splits = 1
        while key_blocks * b * hk * row_splits < 2 * sms and rows // (row_splits * 2) >= 4 * cfg.col_block_m:
            row_splits *= 2
        return replace(cfg, row_splits=row_splits)

    # query subset: few rows. Pass 1 splits the keys so that enough programs run; pass 2 takes one
    # kv head per program (the per-head partial sums cost one small reduction).
    bm = max(16, min(64, next_pow2(rows)))
    lse_bn = 64 if fp32 else 128
    row_blocks = _cdiv(rows, bm)
    key_splits = 1
    while (
        row_blocks * b * h * key_splits < 2 * sms and n // (key_splits * 2) >= 2 * lse_bn and key_splits < 16
    ):
        key_splits *= 2
    return AttentionConfig(
        lse_block_m=bm,
        lse_block_n=lse_bn,
        lse_warps=4,
        lse_stages=3,
        key_splits=key_splits,
        col_block_n=64 if fp32 else 128,
        col_block_m=bm,
        col_warps=4,
        col_stages=2,
        kv_per_prog=1,
        row_splits=1,
    )


@functools.lru_cache(maxsize=64)
def _dummy(device: torch.device) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.int32, device=device)


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    idx: torch.Tensor | None,
    lo: torch.Tensor | None,
    hi: torch.Tensor | None,
    scale: float,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Run both passes. ``idx``: (B, R) int32 contiguous or None (all rows); ``lo``/``hi``: (N,) int32
    segment bounds per token or None. Inputs already validated, same dtype (fp16/bf16/fp32)."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    groups = h // hk
    has_idx = idx is not None
    has_seg = lo is not None
    rows = idx.shape[1] if has_idx else n
    cfg = config or default_config(q, n, rows, hk, groups, has_idx)
    d1, d2 = head_dim_chunks(d)
    upcast = not q.is_cuda  # interpreter (CPU tensors)
    prec = "ieee" if (q.dtype == torch.float32 or upcast) else "tf32"
    if scale < 0:  # the kernels assume a non-negative scale: s * scale == (-q) k^T * |scale|
        q, scale = -q, -scale
    qk_scale = float(scale) * _LOG2E
    dummy = _dummy(q.device)
    idx_t = idx if has_idx else dummy
    lo_t = lo if has_seg else dummy
    hi_t = hi if has_seg else dummy

    # pass 1: row log-sum-exp (base 2)
    key_splits = max(1, int(cfg.key_splits))
    keys_per_split = _cdiv(_cdiv(n, key_splits), cfg.lse_block_n) * cfg.lse_block_n
    key_splits = _cdiv(n, keys_per_split)
    bhr = b * h * rows
    m_buf = torch.empty((key_splits, b, h, rows), dtype=torch.float32, device=q.device)
    l_buf = m_buf if key_splits == 1 else torch.empty_like(m_buf)
    grid1 = (_cdiv(rows, cfg.lse_block_m), b * h, key_splits)
    _lse_kernel[grid1](
        q, k, idx_t, lo_t, hi_t, m_buf, l_buf,
        *q.stride(), *k.stride(),
        n, rows, h, groups, keys_per_split, bhr,
        qk_scale,
        D=d, D1=d1, D2=d2, BLOCK_M=cfg.lse_block_m, BLOCK_N=cfg.lse_block_n,
        HAS_IDX=has_idx, HAS_SEG=has_seg, SPLIT_KEYS=key_splits > 1, PREC=prec, UPCAST=upcast,
        num_warps=cfg.lse_warps, num_stages=cfg.lse_stages,
    )  # fmt: skip

    # pass 2: column sums over rows and heads
    kv_per_prog = max(1, min(int(cfg.kv_per_prog), hk))
    n_chunks = _cdiv(hk, kv_per_prog)
    row_splits = max(1, int(cfg.row_splits))
    rows_per_split = _cdiv(_cdiv(rows, row_splits), cfg.col_block_m) * cfg.col_block_m
    row_splits = _cdiv(rows, rows_per_split)
    partial = torch.empty((n_chunks * row_splits, b, n), dtype=torch.float32, device=q.device)
    grid2 = (_cdiv(n, cfg.col_block_n), b * n_chunks, row_splits)
    _colsum_kernel[grid2](
        q, k, idx_t, lo_t, hi_t, m_buf, l_buf, partial,
        *q.stride(), *k.stride(),
        n, rows, b, h, hk, groups, kv_per_prog, rows_per_split, bhr,
        qk_scale, 1.0 / (h * rows),
        D=d, D1=d1, D2=d2, BLOCK_N=cfg.col_block_n, BLOCK_M=cfg.col_block_m,
        HAS_IDX=has_idx, HAS_SEG=has_seg, KSPLIT=key_splits, PREC=prec, UPCAST=upcast,
        ACC2D=bool(cfg.col_acc2d),
        num_warps=cfg.col_warps, num_stages=cfg.col_stages,
    )  # fmt: skip
    if partial.shape[0] == 1:
        return partial[0]
    return partial.sum(0)


__all__ = ["AttentionConfig", "default_config", "head_dim_chunks", "launch"]
