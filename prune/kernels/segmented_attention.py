"""Attention over segments (block-diagonal windows given by ``cu_seqlens``) in one call.

Qwen-style vision encoders attend inside windows (Qwen2.5-VL) or inside each image / temporal slice
(every Qwen ViT). transformers runs that as one attention call per segment unless the backend takes
``cu_seqlens`` (FlashAttention): ~80 windows x 28 blocks is ~2,300 kernel launches for one
1344 px image. Here it is one call per layer:

- :func:`segmented_attention_reference`: the plain-torch reference (one SDPA call per segment);
  it defines the semantics;
- :func:`segmented_attention_flex`: FlexAttention with a block mask built from the segment ids
  (compiled on CUDA; eager elsewhere, which materializes the scores: tests only);
- :func:`segmented_attention`: the dispatcher (compiled FlexAttention for CUDA tensors with head
  dim >= 16, the reference elsewhere).

FlexAttention on the CPU (torch 2.14): eager works (it materializes the scores: what the tests use);
compiled, the first compile takes about a minute and a second sequence length (dynamic shapes)
fails in inductor's C++ template, so the CPU path is the reference.

All three take (B, H, N, d) queries, (B, Hk, N, d) keys / values (``H % Hk == 0``) and return
(B, H, N, d), as ``scaled_dot_product_attention`` does.

Caching: the block mask is built on the device from ``cu_seqlens`` with no host sync (a few small
kernels) and kept for the ``cu_seqlens`` tensor object it came from (the layers of one encoder
forward share two such tensors: windows and full segments), so one forward builds at most a few.
There is one compiled FlexAttention function per process (``dynamic=None``: a second sequence
length recompiles once with a symbolic length, later lengths reuse it). Its inputs are padded to
whole 128-row blocks (the padding is a segment of its own, dropped after): without that, short
lengths took FlexAttention's decoding kernel and every new range of lengths recompiled, until
dynamo's recompile limit failed the call (seen on the H200 with four encoders in one process).
If a limit is hit anyway, the call falls back to the per-segment reference, with one warning.
"""

from __future__ import annotations

import functools
import threading
import types
import weakref

import torch
import torch.nn.functional as F  # noqa: N812

#: FlexAttention's tile (rows and columns of one block of the block mask)
BLOCK_SIZE = 128
#: the smallest head dim FlexAttention's CUDA kernel takes
MIN_FLEX_HEAD_DIM = 16


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens) -> tuple[int, int, int]:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be (B, H, N, d); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, h, n, _ = q.shape
    if k.shape[0] != b or k.shape[2] != n or v.shape[:3] != k.shape[:3] or k.shape[3] != q.shape[3]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must agree on B and N (and d)")
    hk = k.shape[1]
    if h % hk:
        raise ValueError(f"q heads ({h}) must be a multiple of k heads ({hk})")
    cu = torch.as_tensor(cu_seqlens)
    if cu.ndim != 1 or cu.numel() < 2 or cu.is_floating_point():
        raise ValueError(f"cu_seqlens must be a 1-D integer tensor of S + 1 cumulative lengths; got {tuple(cu.shape)}")
    return b, h, hk


def _bounds(cu_seqlens, n: int) -> list[int]:
    cu = [int(x) for x in torch.as_tensor(cu_seqlens).tolist()]
    if cu[0] != 0 or cu[-1] != n or any(b < a for a, b in zip(cu, cu[1:], strict=False)):
        raise ValueError(f"cu_seqlens must rise from 0 to N={n}; got {cu[:8]}{'...' if len(cu) > 8 else ''}")
    return cu


def segmented_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Softmax attention of every query over the keys of its own segment.

    Args:
        q: (B, H, N, d) queries.
        k, v: (B, Hk, N, d) keys and values; ``H % Hk == 0`` (grouped-query attention).
        cu_seqlens: (S + 1,) integer cumulative segment lengths from 0 to N (empty segments allowed);
            the same segments for every batch row.
        scale: logit scale, ``d ** -0.5`` when None.

    Returns:
        (B, H, N, d) in q's dtype.
    """
    _, h, hk = _check(q, k, v, cu_seqlens)
    cu = _bounds(cu_seqlens, q.shape[2])
    outs = [
        F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], scale=scale, enable_gqa=h != hk)
        for a, b in zip(cu, cu[1:], strict=False)
        if b > a
    ]
    return torch.cat(outs, dim=2) if outs else torch.empty_like(q)


# --------------------------------------------------------------------------------------------------
# FlexAttention path
# --------------------------------------------------------------------------------------------------


def _segment_ids(cu_seqlens: torch.Tensor, n: int, padded: int) -> torch.Tensor:
    """(padded,) int32 segment of each position; positions >= n get S (a segment of their own)."""
    cu = cu_seqlens.to(torch.int64)
    positions = torch.arange(padded, device=cu.device)
    # segment of position p = number of boundaries cu[1:] <= p (empty segments are skipped over)
    ids = torch.searchsorted(cu[1:].contiguous(), positions, right=True)
    return ids.to(torch.int32)  # ids[p] = S exactly for p >= cu[-1] = n


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 1, nq) counts and (1, 1, nq, nk) column indices (selected first, ascending) of a bool
    (nq, nk) block map, as BlockMask.from_kv_blocks takes them."""
    counts = blocks.sum(-1, dtype=torch.int32)
    order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None], order[None, None]


def _segment_mask_mod(ids: torch.Tensor):
    def mask_mod(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    return mask_mod


def segment_block_mask(
    cu_seqlens: torch.Tensor, n: int, device: torch.device | str | None = None, padded: bool = False
):
    """The FlexAttention ``BlockMask`` of block-diagonal segments, built on the device from the
    segment ids at block granularity (no N x N mask, no host sync): a block (i, j) is *full* when
    its rows and columns lie in one segment, *partial* (the mask_mod decides per element) when their
    segment ranges overlap otherwise, and skipped when they do not overlap. ``padded``: for inputs
    padded to whole blocks (the rows from ``n`` on are a segment of their own)."""
    from torch.nn.attention.flex_attention import BlockMask

    device = torch.device(device) if device is not None else cu_seqlens.device
    cu = cu_seqlens.to(device)
    blocks = max(1, -(-n // BLOCK_SIZE))
    ids = _segment_ids(cu, n, blocks * BLOCK_SIZE)
    per_block = ids.view(blocks, BLOCK_SIZE)
    low, high = per_block.amin(-1), per_block.amax(-1)  # segment ranges are contiguous: min..max
    touch = (low[:, None] <= high[None, :]) & (low[None, :] <= high[:, None])  # (q block, kv block)
    single = low == high
    full = touch & single[:, None] & single[None, :]  # padding is its own segment: never full with a real one
    partial = touch & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    length = blocks * BLOCK_SIZE if padded else n
    mask_mod = _segment_mask_mod(ids)
    if _symmetric_constructor():
        # the block map is symmetric (queries and keys share the segments): the query-side tables,
        # which from_kv_blocks derives by transposing with vmap, are the key-side ones. No vmap: it
        # fails inside a compiled graph's custom operator (vision_compile), and costs launches.
        return BlockMask(
            seq_lengths=(length, length), kv_num_blocks=kv_num, kv_indices=kv_idx, full_kv_num_blocks=full_num,
            full_kv_indices=full_idx, q_num_blocks=kv_num, q_indices=kv_idx, full_q_num_blocks=full_num,
            full_q_indices=full_idx, BLOCK_SIZE=(BLOCK_SIZE, BLOCK_SIZE), mask_mod=mask_mod,
        )
    extra = {"seq_lengths": (length, length)} if _takes_seq_lengths() else {}  # older torch: the lengths of q and k
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=BLOCK_SIZE, mask_mod=mask_mod, **extra)


_BLOCK_MASK_FIELDS = ("seq_lengths", "kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                      "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices", "BLOCK_SIZE", "mask_mod")


@functools.lru_cache(maxsize=1)
def _symmetric_constructor() -> bool:
    """True when ``BlockMask(...)`` takes every table by name (torch 2.5 and later)."""
    import inspect

    from torch.nn.attention.flex_attention import BlockMask

    return set(_BLOCK_MASK_FIELDS) <= set(inspect.signature(BlockMask.__init__).parameters)


@functools.lru_cache(maxsize=1)
def _takes_seq_lengths() -> bool:
    import inspect

    from torch.nn.attention.flex_attention import BlockMask

    return "seq_lengths" in inspect.signature(BlockMask.from_kv_blocks).parameters


# Block masks of the cu_seqlens tensors seen last, keyed by the tensor object (and its version and
# the length): the layers of one forward reuse them; a new forward's tensors replace them.
_MASKS: dict[tuple, tuple[weakref.ref, object]] = {}
_MASKS_SIZE = 8
_MASKS_LOCK = threading.Lock()


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version counter
        return -1


def _cached_block_mask(cu_seqlens: torch.Tensor, n: int, device: torch.device, padded: bool = False):
    if cu_seqlens.is_cuda and torch.cuda.is_current_stream_capturing():
        # under CUDA-graph capture (vision_graphs): the mask is built inside the graph, from the
        # graph's static cu_seqlens, so every replay builds it from the boundaries it is given
        return segment_block_mask(cu_seqlens, n, device, padded=padded)
    key = (id(cu_seqlens), _version(cu_seqlens), n, str(device), padded)
    with _MASKS_LOCK:  # threads share the cache (a hit needs the very tensor object, alive)
        hit = _MASKS.get(key)
        if hit is not None and hit[0]() is cu_seqlens:
            return hit[1]
    if cu_seqlens.device.type == "cpu":
        _bounds(cu_seqlens, n)  # host data: validated on the host
    else:
        _check_on_device(cu_seqlens, n)
    mask = segment_block_mask(cu_seqlens, n, device, padded=padded)
    with _MASKS_LOCK:
        for old in [k for k, (ref, _) in _MASKS.items() if ref() is None]:
            del _MASKS[old]
        while len(_MASKS) >= _MASKS_SIZE:
            del _MASKS[next(iter(_MASKS))]
        _MASKS[key] = (weakref.ref(cu_seqlens), mask)
    return mask


def renamed_copy(fn, name: str):
    """``fn`` with a code object of its own named ``name``: dynamo caches compiled graphs, and
    counts recompiles against its limit, per code object."""
    code = fn.__code__
    names = {"co_name": name, **({"co_qualname": name} if hasattr(code, "co_qualname") else {})}  # 3.11+
    return types.FunctionType(code.replace(**names), fn.__globals__, name)


def _flex_call(q, k, v, block_mask, scale, enable_gqa):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


@functools.cache
def _compiled_flex(context: tuple = ()):
    """The ``torch.compile``d FlexAttention of one calling context: whether the call runs inside
    the ``prune::segmented_attention`` operator (a compiled vision layer), with autograd on, under
    inference mode. dynamo's guards tell those contexts apart (the dispatch keys a tensor carries
    there differ), so one shared function would hold a graph per length *per context* and pass its
    recompile limit (8), after which dynamo runs FlexAttention uncompiled, the (N, N) scores
    materialised: a benchmark mixing compiled and eager layers ran its encoder several times slower.
    A code object per context (few: at most 2 x 2 x 2) keeps each context's few graphs apart."""
    fn = renamed_copy(_flex_call, "_prune_flex_" + "_".join(str(int(c)) for c in context))
    return torch.compile(fn, dynamic=None, fullgraph=True)


def _flex_context(q: torch.Tensor, inside_op: bool) -> tuple:
    return inside_op, torch.is_grad_enabled() and q.requires_grad, torch.is_inference_mode_enabled()


def segmented_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
    compiled: bool | None = None,
    _inside_op: bool = False,
) -> torch.Tensor:
    """:func:`segmented_attention_reference` as one FlexAttention call.

    ``compiled``: run the ``torch.compile``d FlexAttention (the fast, fused kernel); None: on CUDA
    only. Uncompiled FlexAttention materializes the (B, H, N, N) scores: small inputs only.
    """
    from torch.nn.attention.flex_attention import flex_attention

    _, h, hk = _check(q, k, v, cu_seqlens)
    if not isinstance(cu_seqlens, torch.Tensor):
        cu_seqlens = torch.tensor(_bounds(cu_seqlens, q.shape[2]), dtype=torch.int32)
    if compiled is None:
        compiled = q.is_cuda
    n = q.shape[2]
    if compiled:
        # Rows padded to whole blocks (a segment of their own, dropped after): every image or video
        # length is one of few shapes, and never a short one, so the compiled function is reused
        # instead of recompiling per length until dynamo's recompile limit fails the call.
        block_mask = _cached_block_mask(cu_seqlens, n, q.device, padded=True)  # validates cu_seqlens
        extra = (-n) % BLOCK_SIZE
        if extra:
            q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, extra)) for t in (q, k, v))
        else:  # one layout for the compiled function (its guards check strides: a view would be a graph more)
            q, k, v = (t.contiguous() for t in (q, k, v))
        try:
            out = _compiled_flex(_flex_context(q, _inside_op))(q, k, v, block_mask, scale, h != hk)
        except _COMPILE_LIMITS as error:  # e.g. many head dims / dtypes in one process
            _warn_fallback(error)
            return segmented_attention_reference(q[:, :, :n], k[:, :, :n], v[:, :, :n], cu_seqlens, scale=scale)
        return out[:, :, :n]
    block_mask = _cached_block_mask(cu_seqlens, n, q.device)  # validates cu_seqlens when it builds
    fn = flex_attention
    import warnings

    with warnings.catch_warnings():  # eager flex warns that it is unfused: that is what we asked for
        warnings.simplefilter("ignore", UserWarning)
        return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=h != hk)


def _compile_limits() -> tuple[type[BaseException], ...]:
    from torch._dynamo import exc

    return tuple(t for t in (getattr(exc, "FailOnRecompileLimitHit", None), getattr(exc, "RecompileLimitExceeded", None))
                 if isinstance(t, type))


_COMPILE_LIMITS = _compile_limits()
_FALLBACK_WARNED = threading.Event()


def _warn_fallback(error: BaseException) -> None:
    if not _FALLBACK_WARNED.is_set():
        _FALLBACK_WARNED.set()
        import warnings

        warnings.warn(f"prune: compiled FlexAttention hit torch.compile's limits ({type(error).__name__}); "
                      "segmented attention runs one SDPA call per segment from now on", RuntimeWarning, stacklevel=3)


def _check_on_device(cu: torch.Tensor, n: int) -> None:
    """Device data checked on the device, without a host sync (an asynchronous assert)."""
    ok = (cu[0] == 0) & (cu[-1] == n) & (cu[1:] >= cu[:-1]).all()
    _assert_async(ok, "cu_seqlens must rise from 0 to N")


def _assert_async(cond: torch.Tensor, msg: str) -> None:
    try:
        torch._assert_async(cond, msg)
    except TypeError:  # older signature without a message
        torch._assert_async(cond)


#: the longest sequence the dense masked path takes (its boolean mask is N x N)
MAX_DENSE_ROWS = 8192


def segmented_attention_dense(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """:func:`segmented_attention_reference` as one SDPA call with the block-diagonal (N, N) boolean
    mask built on the device from the segment ids: no host read, so it runs inside a CUDA graph
    (``vision_graphs``). For short sequences whose head dim FlexAttention's kernel does not take."""
    _, h, hk = _check(q, k, v, cu_seqlens)
    n = q.shape[2]
    cu = torch.as_tensor(cu_seqlens).to(q.device)
    _check_on_device(cu, n)
    ids = _segment_ids(cu, n, n)
    mask = ids[:, None] == ids[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=h != hk)


def segmented_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """Dispatcher: compiled FlexAttention for CUDA tensors; for CUDA tensors with head dims below 16,
    which FlexAttention's CUDA kernel does not take (``tl.dot`` needs K >= 16), the dense masked
    call up to :data:`MAX_DENSE_ROWS` rows; :func:`segmented_attention_reference` elsewhere (same
    signature and semantics).

    Inside ``torch.compile`` tracing (``vision_compile``: a compiled vision layer) it is one opaque
    operator, ``prune::segmented_attention``: the graph around it is compiled without a break, and
    the call runs this dispatcher (its block-mask cache, its own compiled FlexAttention) at run time."""
    if torch.compiler.is_compiling() and isinstance(cu_seqlens, torch.Tensor):
        return _segmented_attention_op(q, k, v, cu_seqlens, scale)
    return _dispatch(q, k, v, cu_seqlens, scale=scale)


def _dispatch(q, k, v, cu_seqlens, *, scale=None, inside_op: bool = False) -> torch.Tensor:
    if q.is_cuda and q.shape[-1] >= MIN_FLEX_HEAD_DIM and v.shape[-1] >= MIN_FLEX_HEAD_DIM:
        return segmented_attention_flex(q, k, v, cu_seqlens, scale=scale, compiled=True, _inside_op=inside_op)
    if q.is_cuda and q.shape[2] <= MAX_DENSE_ROWS and isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.is_cuda:
        return segmented_attention_dense(q, k, v, cu_seqlens, scale=scale)
    return segmented_attention_reference(q, k, v, cu_seqlens, scale=scale)


@torch.library.custom_op("prune::segmented_attention", mutates_args=())
def _segmented_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None
) -> torch.Tensor:
    return _dispatch(q, k, v, cu_seqlens, scale=scale, inside_op=True).contiguous()  # the strides its fake promises


@_segmented_attention_op.register_fake
def _(q, k, v, cu_seqlens, scale):
    return q.new_empty(q.shape)  # contiguous (B, H, N, d)
