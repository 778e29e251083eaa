"""Kernels in prune.kernels: Triton paths against their plain-torch references, references against
naive formulas, dispatch and input errors.

On a CPU-only machine the Triton kernels run in Triton's interpreter: this module sets
``TRITON_INTERPRET=1`` before anything imports Triton. If Triton was already imported in compiled
mode by another module of the session (and there is no GPU), the in-process Triton checks are skipped
and ``test_triton_checks_in_subprocess`` reruns this module in a fresh interpreter-mode process.
With a GPU, the same small-shape checks run compiled on CUDA, and the ``gpu``-marked tests compare
on real shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

_CUDA = torch.cuda.is_available()
if not _CUDA and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first `import triton`

import pytest  # noqa: E402

from prune.kernels import (  # noqa: E402
    attention_stats,
    attention_stats_reference,
    attention_stats_triton,
    topk_gather,
    topk_gather_reference,
    topk_gather_triton,
    transition_variation,
    transition_variation_reference,
    transition_variation_triton,
)
from prune.kernels._triton_support import interpret_mode, triton_importable  # noqa: E402

try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    given = None

if not triton_importable():
    _TRITON_STATE = "missing"
elif _CUDA:
    _TRITON_STATE = "cuda"
elif interpret_mode():
    _TRITON_STATE = "interpret"
else:
    _TRITON_STATE = "compiled-without-gpu"

DEV = "cuda" if _CUDA else "cpu"
needs_triton = pytest.mark.skipif(
    _TRITON_STATE not in ("cuda", "interpret"),
    reason=(
        "Triton is not installed"
        if _TRITON_STATE == "missing"
        else "triton was imported without TRITON_INTERPRET=1 before this module and there is no GPU; "
        "test_triton_checks_in_subprocess runs these checks in a fresh process"
    ),
)
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not _CUDA, reason="needs a CUDA device")

FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _tol(dtype):
    # logits from the same (exactly representable) inputs, fp32 accumulation in both paths
    return dict(atol=1e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-5, rtol=1e-3)


def _randn(*shape, dtype=torch.float32, gen=None, device=DEV):
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


# --------------------------------------------------------------------------------------------------
# attention_stats: reference against a naive materialized softmax (float64)
# --------------------------------------------------------------------------------------------------


def naive_attention_stats(q, k, query_index=None, segments=None, scale=None):
    """Materialize every (B, H, N, N) softmax with a block-diagonal mask, in float64."""
    b, h, n, d = q.shape
    hk = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    kk = k.double().repeat_interleave(h // hk, dim=1)
    logits = torch.einsum("bhqd,bhkd->bhqk", q.double(), kk) * scale
    if segments is not None:
        seg_id = torch.zeros(n, dtype=torch.long)
        for i, (a, e) in enumerate(zip(segments[:-1], segments[1:], strict=True)):
            seg_id[a:e] = i
        allowed = seg_id[:, None] == seg_id[None, :]
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    p = logits.softmax(-1)  # (B, H, N, N)
    if query_index is None:
        rows = torch.arange(n).expand(b, n)
    else:
        rows = torch.as_tensor(query_index).long()
        rows = rows.expand(b, -1) if rows.ndim == 1 else rows
    out = torch.stack([p[i][:, rows[i].to(p.device)].sum(dim=(0, 1)) for i in range(b)])
    return (out / (h * rows.shape[1])).float()


REF_CASES = [
    dict(b=1, h=2, hk=2, n=7, d=4),
    dict(b=2, h=4, hk=2, n=9, d=3, query_index=[0]),
    dict(b=2, h=2, hk=1, n=8, d=5, query_index=[[1, 1, 7], [0, 2, 3]], scale=0.3),
    dict(b=1, h=2, hk=2, n=10, d=4, segments=[0, 3, 3, 7, 10]),
    dict(b=2, h=2, hk=2, n=10, d=4, segments=[0, 4, 10], query_index=[[0, 5], [9, 3]]),
]


@pytest.mark.parametrize(
    "case", REF_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items() if k != "segments")
)
def test_reference_matches_naive_softmax(case):
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(case["b"], case["h"], case["n"], case["d"], generator=gen)
    k = torch.randn(case["b"], case["hk"], case["n"], case["d"], generator=gen)
    kw = {key: case[key] for key in ("query_index", "segments", "scale") if key in case}
    qi = kw.get("query_index")
    got = attention_stats_reference(q, k, **{**kw, **({"query_index": torch.tensor(qi)} if qi else {})})
    want = naive_attention_stats(q, k, **kw)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # every chosen row's softmax sums to one: the (B, N) result sums to one per batch row
    torch.testing.assert_close(got.sum(-1), torch.ones(case["b"]), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------------
# attention_stats: Triton against the reference (small shapes; interpreter on CPU)
# --------------------------------------------------------------------------------------------------


def _attention_inputs(b, h, hk, n, d, dtype, seed=0, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        q = _randn(b, h, n, d, dtype=dtype, gen=gen)
        k = _randn(b, hk, n, d, dtype=dtype, gen=gen)
    elif layout == "bnhd":  # as a projection's (B, N, H, d) output viewed as (B, H, N, d)
        q = _randn(b, n, h, d, dtype=dtype, gen=gen).transpose(1, 2)
        k = _randn(b, n, hk, d, dtype=dtype, gen=gen).transpose(1, 2)
    else:  # "strided": every other element of the head dim, and a sliced sequence
        q = _randn(b, h, n + 3, 2 * d, dtype=dtype, gen=gen)[:, :, 2 : n + 2, ::2]
        k = _randn(b, hk, n, 2 * d, dtype=dtype, gen=gen)[..., 1::2]
    return q, k


ATTN_CASES = {
    "basic": dict(b=2, h=2, hk=2, n=37, d=16),
    "gqa": dict(b=1, h=4, hk=2, n=33, d=16),
    "mqa-odd-d": dict(b=1, h=3, hk=1, n=21, d=12),
    "d24-two-chunks": dict(b=1, h=2, hk=2, n=19, d=24),
    "segments": dict(b=2, h=2, hk=1, n=40, d=8, segments=[0, 5, 5, 22, 23, 40]),
    "cls": dict(b=2, h=2, hk=2, n=29, d=16, query_index=[0]),
    "rows-BQ": dict(b=2, h=4, hk=2, n=31, d=8, query_index=[[0, 3, 3, 30], [17, 1, 2, 9]]),
    "rows-seg": dict(b=1, h=2, hk=2, n=36, d=8, query_index=[35, 0, 20], segments=[0, 16, 36]),
    "bnhd": dict(b=2, h=2, hk=1, n=25, d=16, layout="bnhd", scale=0.7),
    "strided": dict(b=1, h=2, hk=2, n=18, d=8, layout="strided"),
    "n1": dict(b=1, h=2, hk=2, n=1, d=8),
    "neg-scale": dict(b=1, h=2, hk=2, n=20, d=8, scale=-0.5),
}


def _run_attention_case(case, dtype, config=None, seed=0):
    c = dict(case)
    q, k = _attention_inputs(
        c["b"], c["h"], c["hk"], c["n"], c["d"], dtype, seed, c.get("layout", "contiguous")
    )
    kw = {key: c[key] for key in ("query_index", "segments", "scale") if key in c}
    if "query_index" in kw:
        kw["query_index"] = torch.tensor(kw["query_index"])
    want = attention_stats_reference(q, k, **kw)
    got = attention_stats_triton(q, k, **kw, config=config)
    assert got.dtype == torch.float32 and got.shape == (c["b"], c["n"])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **_tol(dtype))


@needs_triton
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", list(ATTN_CASES))
def test_attention_triton_matches_reference(name, dtype):
    _run_attention_case(ATTN_CASES[name], dtype)


@needs_triton
@pytest.mark.parametrize(
    "name,cfg",
    [
        ("basic", dict(key_splits=3, row_splits=2)),  # split keys in pass 1, rows in pass 2
        ("gqa", dict(kv_per_prog=2, row_splits=3)),  # several kv heads per program
        ("rows-BQ", dict(key_splits=2, kv_per_prog=1, lse_block_m=16, col_block_n=32)),
        ("segments", dict(key_splits=2, row_splits=2)),
        ("rows-seg", dict(key_splits=4, kv_per_prog=2)),
        ("segments", dict(row_splits=2, col_acc2d=True)),  # 2-D accumulator in pass 2
    ],
)
def test_attention_triton_launch_variants(name, cfg):
    from dataclasses import replace

    from prune.kernels._attention_stats_triton import AttentionConfig

    base = (
        AttentionConfig(16, 16, 1, 1, 1, 16, 16, 1, 1, 1, 1)
        if DEV == "cpu"
        else AttentionConfig(64, 32, 4, 2, 1, 32, 32, 4, 2, 1, 1)
    )
    _run_attention_case(ATTN_CASES[name], torch.float32, config=replace(base, **cfg))


@needs_triton
def test_attention_triton_mixed_and_float64_inputs():
    q, k = _attention_inputs(1, 2, 2, 13, 8, torch.float64)
    torch.testing.assert_close(
        attention_stats_triton(q, k), attention_stats_reference(q, k), atol=1e-5, rtol=1e-4
    )
    q2 = q.to(torch.bfloat16)
    torch.testing.assert_close(
        attention_stats_triton(q2, k.float()), attention_stats_reference(q2, k.float()), atol=1e-5, rtol=1e-4
    )


@needs_triton
def test_attention_triton_empty_queries_and_index_forms():
    q, k = _attention_inputs(2, 2, 2, 11, 8, torch.float32)
    out = attention_stats_triton(q, k, query_index=torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (2, 11) and not out.any()
    want = attention_stats_reference(q, k, query_index=torch.tensor([4]))
    for qi in (4, [4], torch.tensor(4), torch.tensor([4]), torch.tensor([[4], [4]])):
        torch.testing.assert_close(attention_stats_triton(q, k, query_index=qi), want, atol=1e-5, rtol=1e-4)
    # a single full-length segment is the same as no segments
    torch.testing.assert_close(
        attention_stats_triton(q, k, segments=[0, 11]), attention_stats_reference(q, k)
    )


if given is not None:

    @needs_triton
    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        b=st.integers(1, 2),
        hk=st.integers(1, 2),
        groups=st.integers(1, 2),
        n=st.integers(1, 40),
        d=st.sampled_from([4, 8, 16, 20]),
        mode=st.sampled_from(["all", "rows", "segments", "rows+segments"]),
        dtype=st.sampled_from(FLOAT_DTYPES),
        seed=st.integers(0, 2**16),
    )
    def test_attention_triton_random_shapes(b, hk, groups, n, d, mode, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        q, k = _attention_inputs(b, hk * groups, hk, n, d, dtype, seed)
        kw = {}
        if "rows" in mode:
            kw["query_index"] = torch.randint(
                0, n, (b, int(torch.randint(1, 5, (1,), generator=gen))), generator=gen
            )
        if "segments" in mode:
            cuts = torch.randint(0, n + 1, (3,), generator=gen).sort().values.tolist()
            kw["segments"] = [0, *cuts, n]
        torch.testing.assert_close(
            attention_stats_triton(q, k, **kw), attention_stats_reference(q, k, **kw), **_tol(dtype)
        )


# --------------------------------------------------------------------------------------------------
# attention_stats: input errors, dispatch
# --------------------------------------------------------------------------------------------------

_ATTN_FNS = [attention_stats_reference, attention_stats]
if _TRITON_STATE in ("cuda", "interpret"):
    _ATTN_FNS.append(attention_stats_triton)


@pytest.mark.parametrize("fn", _ATTN_FNS, ids=lambda f: f.__name__)
def test_attention_bad_inputs(fn):
    q = torch.randn(1, 4, 6, 8, device=DEV)
    k = torch.randn(1, 2, 6, 8, device=DEV)
    with pytest.raises(ValueError, match="must be"):
        fn(q[0], k)  # 3-D
    with pytest.raises(ValueError, match="agree"):
        fn(q, k[:, :, :5])
    with pytest.raises(ValueError, match="multiple"):
        fn(q, torch.randn(1, 3, 6, 8, device=DEV))
    with pytest.raises(ValueError, match="query_index"):
        fn(q, k, query_index=torch.tensor([6]))
    with pytest.raises(ValueError, match="query_index"):
        fn(q, k, query_index=torch.tensor([-1]))
    with pytest.raises(ValueError, match="query_index"):
        fn(q, k, query_index=torch.zeros(2, 1, dtype=torch.long))  # B mismatch
    with pytest.raises(ValueError, match="segments"):
        fn(q, k, segments=[0, 4])  # does not end at N
    with pytest.raises(ValueError, match="segments"):
        fn(q, k, segments=[0, 4, 2, 6])  # decreasing


def test_dispatch_uses_reference_off_gpu(monkeypatch):
    mod = sys.modules["prune.kernels.attention_stats"]  # the package's `attention_stats` is the function

    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)

    def boom(*a, **kw):
        raise AssertionError("Triton path used for CPU tensors")

    monkeypatch.setattr(mod, "attention_stats_triton", boom)
    torch.testing.assert_close(attention_stats(q, k), attention_stats_reference(q, k))


def test_import_without_triton():
    """`import prune.kernels` and the dispatchers work when triton cannot be imported (e.g. macOS)."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, prune.kernels as K\n"
        "assert not K.triton_importable()\n"
        "q = torch.randn(1, 2, 5, 4)\n"
        "print(K.attention_stats(q, q).shape, K.topk_gather(q[0], q[0, :, :, 0], 2)[1].shape,"
        " K.transition_variation(q[0], q[0])[0].shape)\n"
        "try:\n    K.attention_stats_triton(q, q)\nexcept RuntimeError as e:\n    print('ok', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ok attention_stats_triton: Triton is not installed" in res.stdout


@pytest.mark.skipif(_TRITON_STATE != "compiled-without-gpu", reason="the Triton checks run in this process")
def test_triton_checks_in_subprocess():
    """Triton was imported (compiled mode) before this module, e.g. by torch through conftest, and there
    is no GPU: run this module's Triton checks in a fresh process with TRITON_INTERPRET=1."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not gpu"]
    cmd += ["-k", "triton and not without_triton and not in_subprocess", os.path.abspath(__file__)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=900)
    tail = res.stdout[-4000:] + res.stderr[-2000:]
    assert res.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.splitlines()[-1], tail
    print(tail.splitlines()[-1])


# --------------------------------------------------------------------------------------------------
# topk_gather
# --------------------------------------------------------------------------------------------------


def naive_topk(scores_row, k):
    """Python: stable descending order (lower index wins ties), first k, ascending."""
    vals = scores_row.tolist()
    order = sorted(range(len(vals)), key=lambda i: (-vals[i], i))
    return sorted(order[:k])


def test_topk_reference_semantics():
    scores = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    x = torch.arange(2 * 6 * 2, dtype=torch.float32).view(2, 6, 2)
    g, idx = topk_gather_reference(x, scores, 3)
    assert idx.tolist() == [[1, 2, 4], [0, 1, 2]]
    assert torch.equal(g, torch.stack([x[0, [1, 2, 4]], x[1, [0, 1, 2]]]))
    for _ in range(3):
        s = torch.randint(0, 4, (2, 15)).float()
        _, idx = topk_gather_reference(torch.randn(2, 15, 3), s, 6)
        assert idx.tolist() == [naive_topk(s[0], 6), naive_topk(s[1], 6)]
    # ragged
    g, idx = topk_gather_reference(x, scores, torch.tensor([2, 0]))
    assert idx.tolist() == [[1, 2], [-1, -1]]
    assert torch.equal(g[0], x[0, [1, 2]]) and not g[1].any()


def _topk_inputs(b, n, d, dtype, seed, ties=True, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        x = _randn(b, n, d, dtype=dtype, gen=gen)
    else:  # a transposed view
        x = _randn(b, d, n, dtype=dtype, gen=gen).transpose(1, 2)
    s = torch.randint(0, 5, (b, n), generator=gen).float() if ties else torch.randn(b, n, generator=gen)
    return x, s.to(DEV)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64], ids=str)
@pytest.mark.parametrize("k", [0, 1, 9, 23, "ragged"], ids=lambda v: f"k{v}")
def test_topk_triton_matches_reference(dtype, k):
    b, n, d = 3, 23, 10
    x, s = _topk_inputs(b, n, d, torch.float32, seed=7)
    x = (x * 10).to(dtype)
    kk = torch.tensor([0, 5, 23], device=DEV) if k == "ragged" else k
    g1, i1 = topk_gather_triton(x, s, kk)
    g2, i2 = topk_gather_reference(x, s, kk)
    assert torch.equal(i1, i2) and torch.equal(g1, g2)
    assert g1.is_contiguous() and g1.dtype == x.dtype and i1.dtype == torch.int64


@needs_triton
@pytest.mark.parametrize(
    "score_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32]
)
def test_topk_triton_score_dtypes_and_specials(score_dtype):
    x, _ = _topk_inputs(2, 17, 5, torch.float32, seed=3, layout="transposed")
    s = torch.tensor(
        [
            [0.0, -0.0, 1.0, float("nan"), float("inf"), -1.0, 1.0, float("-inf"), 0.5] + [0.25] * 8,
            [2.0, 2.0, -3.0, 2.0, 7.0, 7.0, 0.0, -0.0, 0.0] + [-5.0] * 8,
        ]
    )
    if not score_dtype.is_floating_point:
        s = torch.nan_to_num(s, nan=9.0, posinf=8.0, neginf=-8.0)
    s = s.to(score_dtype).to(DEV)
    for k in (3, 8, 12):
        g1, i1 = topk_gather_triton(x, s, k)
        g2, i2 = topk_gather_reference(x, s, k)
        assert torch.equal(i1, i2), (k, i1, i2)
        assert torch.equal(g1, g2)


def test_topk_bad_inputs():
    x, s = torch.randn(2, 5, 3), torch.randn(2, 5)
    for fn in (topk_gather_reference, topk_gather):
        with pytest.raises(ValueError):
            fn(x, s[:, :4], 2)
        with pytest.raises(ValueError):
            fn(x[0], s, 2)
        with pytest.raises(ValueError):
            fn(x, s, 6)
        with pytest.raises(ValueError):
            fn(x, s, -1)
        with pytest.raises(ValueError):
            fn(x, s, torch.tensor([1, 6]))
        with pytest.raises(ValueError):
            fn(x, s, torch.tensor([1, 2, 3]))
        with pytest.raises(TypeError):
            fn(x, s, 2.5)
        with pytest.raises(TypeError):
            fn(x, s, torch.tensor([1.0, 2.0]))


# --------------------------------------------------------------------------------------------------
# transition_variation
# --------------------------------------------------------------------------------------------------


def test_transition_reference_semantics():
    hb = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 0.0]]])
    ha = torch.tensor([[[6.0, 8.0], [0.0, 2.0], [1.0, 0.0], [-1.0, -1.0], [0.0, 0.0]]])
    ratio, var = transition_variation_reference(hb, ha)
    torch.testing.assert_close(ratio[0, :2], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(var[0], torch.tensor([0.0, 1.0, 1.0, 2.0, 1.0]))
    torch.testing.assert_close(ratio[0, 2:], torch.tensor([1e8, 1.0, 0.0]))  # zero before: ||after|| / eps
    x = torch.randn(2, 7, 9, dtype=torch.float64)
    y = torch.randn(2, 7, 9, dtype=torch.float64)
    r, v = transition_variation_reference(x, y)
    torch.testing.assert_close(r, (y.norm(dim=-1) / x.norm(dim=-1)).float())
    torch.testing.assert_close(v, (1 - torch.nn.functional.cosine_similarity(x, y, dim=-1)).float())


@needs_triton
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "shape,layout", [((2, 9, 16), "contiguous"), ((1, 13, 37), "transposed"), ((3, 5, 1), "contiguous")]
)
def test_transition_triton_matches_reference(dtype, shape, layout):
    gen = torch.Generator().manual_seed(shape[2])
    b, n, d = shape
    if layout == "contiguous":
        hb, ha = _randn(b, n, d, dtype=dtype, gen=gen), _randn(b, n, d, dtype=dtype, gen=gen)
    else:
        hb = _randn(b, d, n, dtype=dtype, gen=gen).transpose(1, 2)
        ha = _randn(b, n, 2 * d, dtype=dtype, gen=gen)[..., ::2]
    hb[0, 0] = 0  # zero vectors
    ha[0, 1] = 0
    hb[-1, -1] = 0
    ha[-1, -1] = 0
    ha[0, 2] = hb[0, 2] * 3  # parallel: variation 0
    r1, v1 = transition_variation_triton(hb, ha)
    r2, v2 = transition_variation_reference(hb, ha)
    assert r1.dtype == v1.dtype == torch.float32 and r1.shape == (b, n)
    torch.testing.assert_close(r1, r2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
    assert v1.min() >= 0 and v1.max() <= 2


def test_transition_bad_inputs():
    for fn in (transition_variation_reference, transition_variation):
        with pytest.raises(ValueError):
            fn(torch.randn(2, 3, 4), torch.randn(2, 3, 5))
        with pytest.raises(ValueError):
            fn(torch.randn(3, 4), torch.randn(3, 4))
        with pytest.raises(TypeError):
            fn(torch.ones(2, 3, 4, dtype=torch.long), torch.ones(2, 3, 4, dtype=torch.long))


# --------------------------------------------------------------------------------------------------
# GPU: real shapes (compiled Triton against the reference)
# --------------------------------------------------------------------------------------------------


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@gpu
@needs_cuda
@pytest.mark.parametrize("n", [577, 2304, 4096])
@pytest.mark.parametrize("d", [64, 80])
@pytest.mark.parametrize("b", [1, 2])
def test_gpu_attention_real_shapes(b, d, n):
    from prune.kernels._triton_support import use_triton

    gen = torch.Generator(device="cuda").manual_seed(n + d + b)
    q = torch.randn(b, 16, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k = torch.randn(b, 16, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) * 2
    assert use_triton(q, k)
    rows = torch.randperm(n, device="cuda", generator=gen)[:32]
    windows = list(range(0, n, 256)) + [n]
    cases = [
        {},
        {"query_index": [0]},
        {"query_index": rows.cpu()},
        {"query_index": rows},  # on the device: checked without a host sync
        {"query_index": torch.stack([rows, rows.flip(0)]) if b == 2 else rows[None]},
        {"segments": windows},
        {"segments": torch.tensor(windows, device="cuda"), "query_index": rows.cpu()},
    ]
    for kw in cases:
        got = attention_stats(q, k, **kw)
        want = attention_stats_reference(q, k, **kw)
        assert torch.isfinite(got).all()
        assert _rel(got, want) < 1e-4, (kw.keys(), _rel(got, want))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-3)
    # GQA (4 kv heads), a (B, N, H, d) layout, fp16 and fp32
    kg = k[:, :4].contiguous()
    torch.testing.assert_close(attention_stats(q, kg), attention_stats_reference(q, kg), atol=1e-5, rtol=1e-3)
    qt, kt = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    torch.testing.assert_close(
        attention_stats(qt, kt), attention_stats_reference(qt, kt), atol=1e-5, rtol=1e-3
    )
    for dt in (torch.float16, torch.float32):
        q2, k2 = q.to(dt), k.to(dt)
        torch.testing.assert_close(
            attention_stats(q2, k2, query_index=[0, 5]),
            attention_stats_reference(q2, k2, query_index=[0, 5]),
            atol=1e-5,
            rtol=1e-3,
        )
    if n == 577 and b == 1:
        torch.testing.assert_close(
            attention_stats(q.float(), k.float()),
            attention_stats_reference(q.float(), k.float()),
            atol=1e-6,
            rtol=1e-4,
        )


@gpu
@needs_cuda
@pytest.mark.parametrize("b,n,dim", [(1, 577, 1024), (2, 2304, 1280), (2, 4096, 3584)])
def test_gpu_topk_and_transition_real_shapes(b, n, dim):
    gen = torch.Generator(device="cuda").manual_seed(n)
    x = torch.randn(b, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    y = torch.randn(b, n, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    s = torch.randint(0, 50, (b, n), device="cuda", generator=gen).float()  # many ties
    for k in (n // 3, torch.tensor([n // 4, n // 2][:b], device="cuda")):
        g1, i1 = topk_gather(x, s, k)
        g2, i2 = topk_gather_reference(x, s, k)
        assert torch.equal(i1, i2) and torch.equal(g1, g2)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    g1, i1 = topk_gather(xt, s, n // 5)
    assert torch.equal(g1, topk_gather_reference(xt, s, n // 5)[0])
    r1, v1 = transition_variation(x, y)
    r2, v2 = transition_variation_reference(x, y)
    torch.testing.assert_close(r1, r2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v1, v2, atol=1e-5, rtol=1e-5)
