"""The batched, sync-free selection (``Method.select_batch``) against each method's per-view reference
(``Method.select``): the same token sets on random ragged views, ties, every option; then through every
family adapter, the batched path against the per-view reference run view by view."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import prune
from prune.methods import get_method
from prune.methods.base import Method, SignalRequest, ViewBatch, stable_topk, stable_topk_mask

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# method, options: every option that changes the selection
CASES = [
    ("cls", {}),
    ("cls", {"score_dtype": "float16"}),
    ("cls", {"variant": "vtc"}),
    ("hiprune", {}),
    ("hiprune", {"alpha": 1.0}),
    ("hiprune", {"alpha": 4.0}),  # anchors + buffers can exceed the budget
    ("hiprune", {"alpha": 2.5, "wrap_rows": False}),
    ("hiprune", {"exclusion": "reference", "alpha": 1.5}),
    ("hiprune", {"score_dtype": "bfloat16", "alpha": 1.0}),
    ("random", {}),
    ("random", {"seed": 7}),
    ("pool", {}),
]


def _bind(name, options, keys):
    method = get_method(name)(**options)
    if name == "hiprune":
        method.requests = [SignalRequest(0), SignalRequest(1)]
    elif name == "cls":
        method.requests = [SignalRequest(layer, "cls") for layer in range(len(keys))]
    else:
        method.requests = []
    return method


@st.composite
def batches(draw):
    """A ViewBatch of 1-5 ragged views: some invalid patches, coarse scores (many ties), budgets
    from 1 to one below the valid count (a view that fits its budget is never ranked)."""
    views = draw(st.integers(1, 5))
    grids, valids, budgets = [], [], []
    for _ in range(views):
        h, w = draw(st.integers(1, 7)), draw(st.integers(2, 7))
        bits = draw(st.lists(st.booleans(), min_size=h * w, max_size=h * w))
        valid = torch.tensor(bits) | (torch.arange(h * w) < 2)  # at least two valid patches
        grids.append((h, w))
        valids.append(valid)
        budgets.append(draw(st.integers(1, int(valid.sum()) - 1)))
    width = max(h * w for h, w in grids)
    valid = torch.zeros(views, width, dtype=torch.bool)
    for v, m in enumerate(valids):
        valid[v, : m.numel()] = m
    levels = draw(st.sampled_from([2, 3, 50]))  # few levels: ties everywhere
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    pad = torch.arange(width)[None, :] >= torch.tensor([h * w for h, w in grids])[:, None]
    signals = {}
    for key in ("all@0", "all@1", "cls@0", "cls@1"):
        scores = torch.randint(0, levels, (views, width), generator=gen).float() / levels
        signals[key] = scores.masked_fill(pad, float("-inf"))
    index = draw(st.lists(st.integers(0, 4), min_size=views, max_size=views))
    return ViewBatch(grids=grids, budgets=budgets, valid=valid, valid_host=valid.clone(), signals=signals, index=index)


def _check(method, batch):
    sel = method.select_batch(batch)
    assert sel.keep.shape == batch.valid.shape and not bool((sel.keep & ~batch.valid).any())
    for v in range(len(batch)):
        view = batch.view(v)
        view.signals = {r.key: view.signals[r.key] for r in method.requests}
        ref = method.select(view)
        n = view.num_patches
        assert torch.nonzero(sel.keep[v]).view(-1).tolist() == sorted(ref.keep.tolist()), (v, batch.grids[v])
        if sel.counts is not None:
            assert sel.counts[v] == ref.keep.numel()
        if ref.assign is not None:
            assert sel.assign[v, :n].tolist() == ref.assign.tolist()
            assert bool((sel.assign[v, n:] == -1).all())
        if ref.score is not None:
            torch.testing.assert_close(sel.score[v, :n], ref.score.float(), rtol=0, atol=0)


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{o}" for n, o in CASES])
@SETTINGS
@given(batch=batches())
def test_batch_selects_the_reference_token_sets(name, options, batch):
    method = _bind(name, options, ["cls@0", "cls@1"])
    if name == "cls":
        batch.signals = {k: batch.signals[k] for k in ("cls@0", "cls@1")}
    _check(method, batch)


@pytest.mark.parametrize("name,options", CASES[:4] + CASES[-2:], ids=[f"{n}-{o}" for n, o in CASES[:4] + CASES[-2:]])
def test_the_base_loop_equals_the_batched_path(name, options):
    """``Method.select_batch`` (the per-view loop every other method gets) gives the batched answer."""
    batch = _fixed_batch()
    method = _bind(name, options, ["cls@0", "cls@1"])
    if name == "cls":
        batch.signals = {k: batch.signals[k] for k in ("cls@0", "cls@1")}
    fast, slow = method.select_batch(batch), Method.select_batch(method, batch)
    assert torch.equal(fast.keep, slow.keep)
    assert fast.counts == slow.counts or fast.counts is None


def _fixed_batch():
    gen = torch.Generator().manual_seed(5)
    grids = [(4, 6), (4, 6), (3, 5)]
    valid = torch.zeros(3, 24, dtype=torch.bool)
    valid[0], valid[1, :20], valid[2, :15] = True, True, True
    signals = {k: torch.randint(0, 4, (3, 24), generator=gen).float() for k in ("all@0", "all@1", "cls@0", "cls@1")}
    return ViewBatch(grids=grids, budgets=[7, 3, 14], valid=valid, valid_host=valid, signals=signals, index=[0, 1, 0])


@SETTINGS
@given(
    scores=st.lists(st.sampled_from([0.0, -0.0, 1.0, 2.0, float("inf"), float("nan")]), min_size=1, max_size=30),
    k=st.integers(0, 30),
    allowed_bits=st.lists(st.booleans(), min_size=30, max_size=30),
)
def test_row_topk_breaks_ties_as_stable_topk(scores, k, allowed_bits):
    s = torch.tensor(scores)
    allowed = torch.tensor(allowed_bits[: s.numel()])
    k = min(k, s.numel())
    for a in (None, allowed):
        ref = stable_topk(s, k, a)
        got = stable_topk_mask(s[None], [k], None if a is None else a[None])[0]
        assert torch.nonzero(got).view(-1).tolist() == sorted(ref.tolist())
        # a per-row k held on the device gives the same
        got = stable_topk_mask(s[None], torch.tensor([k]), None if a is None else a[None], kmax=k)[0]
        assert torch.nonzero(got).view(-1).tolist() == sorted(ref.tolist())


# ---- through the adapters: the batched path against the per-view reference ----------------------------


def _reference_path(monkeypatch):
    """Make every method select view by view with its ``select`` (the readable reference)."""
    for name in ("cls", "hiprune", "random", "pool"):
        monkeypatch.setattr(get_method(name), "select_batch", Method.select_batch)


def _run(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
    last = model.prune_state.last
    return logits, last.keep_mask.clone(), [(im.sample, im.kept.tolist(), im.tokens_after) for im in last.images]


def _family_cases():
    from prune._tiny import (
        gemma3_inputs,
        internvl_inputs,
        qwen_media,
        qwen_prompts,
        tiny_gemma3,
        tiny_internvl,
        tiny_llava,
        tiny_qwen_vl,
    )

    def qwen(version):
        def build():
            prompts = [[("image", (1, 8, 12)), ("video", (2, 8, 8))], [], [("image", (1, 8, 8))]]
            inputs = qwen_prompts(prompts, [9, 5, 12], seed=1)
            for kind, pv, gk in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos",
                                                                               "video_grid_thw")):
                grids = [g for p in prompts for k, g in p if k == kind]
                inputs[pv], inputs[gk] = qwen_media(grids, seed=3 + len(kind))
            return tiny_qwen_vl(version), inputs
        return build

    def llava():
        from prune._tiny import build_prompts, image_token_counts

        model = tiny_llava()
        pv = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        counts = image_token_counts(model, pv, None)
        ids, mask = build_prompts([[counts[0]], [], [counts[1], counts[2]]], [6, 11, 4])
        return model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}

    def llava_next():
        from tests.conftest import Case

        case = Case("llava_next", prompts=((0,), (1, 2), (), (3,)), text_lens=(5, 14, 9, 20), seed=3)
        return case.model, case.inputs()

    def onevision():
        from prune._tiny import tiny_llava_onevision
        from tests.test_onevision import build

        model = tiny_llava_onevision()
        return model, build(model, [[("image", 0)], [("image", 1)], [("video", 3)]], [6, 9, 4], seed=2)

    def qwen3():
        import transformers

        if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):
            pytest.skip("no Qwen3-VL in this transformers")
        from prune._tiny import qwen3_prompts, tiny_qwen3_vl

        prompts = [[("image", (1, 8, 12)), ("video", (2, 8, 8))], [("image", (1, 8, 8))]]
        inputs = qwen3_prompts(prompts, [9, 5], seed=1)
        for kind, pv, gk in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos",
                                                                           "video_grid_thw")):
            grids = [g for p in prompts for k, g in p if k == kind]
            inputs[pv], inputs[gk] = qwen_media(grids, seed=3 + len(kind))
        return tiny_qwen3_vl(), inputs

    def omni():
        from prune._tiny import omni_inputs, tiny_omni_thinker

        items = [[("image", (1, 8, 12)), ("video+audio", (6, 8, 8), 0.5, 300)], [("video+audio", (2, 8, 8), 1.0, 100)]]
        return tiny_omni_thinker(), omni_inputs(items, [9, 5], seed=1)

    cases = {
        "llava": (llava, ["random", "pool", "cls", "hiprune"]),
        "llava_onevision": (onevision, ["random", "pool", "hiprune"]),
        "qwen3_vl": (qwen3, ["random", "pool", "hiprune"]),
        "qwen2_5_omni": (omni, ["random", "pool", "hiprune"]),
        "llava_next": (llava_next, ["random", "pool", "cls", "hiprune"]),
        "qwen2_vl": (qwen("2"), ["random", "pool", "hiprune"]),
        "qwen2_5_vl": (qwen("2.5"), ["random", "pool", "hiprune"]),
        "internvl": (lambda: (tiny_internvl(), internvl_inputs([[3, 1], [], [2]], [9, 4, 6])),
                     ["random", "pool", "cls", "hiprune"]),
        "gemma3": (lambda: (tiny_gemma3(), gemma3_inputs([2, 0, 1], [9, 5, 7])), ["random", "pool", "hiprune"]),
    }
    return cases


FAMILY = [(f, m) for f, (_, methods) in _family_cases().items() for m in methods]


@pytest.mark.parametrize("family,method", FAMILY, ids=[f"{f}-{m}" for f, m in FAMILY])
@pytest.mark.parametrize("keep", [0.3, 5])
def test_adapter_batch_path_equals_per_view_reference(monkeypatch, family, method, keep):
    build, _ = _family_cases()[family]
    model, inputs = build()
    options = {"alpha": 1.0} if method == "hiprune" else {}
    prune.wrap(model, method, keep=keep, **options)
    fast = _run(model, inputs)
    with monkeypatch.context() as patch:
        _reference_path(patch)
        slow = _run(model, inputs)
    assert torch.equal(fast[1], slow[1])
    assert fast[2] == slow[2]
    torch.testing.assert_close(fast[0], slow[0], rtol=1e-5, atol=1e-5)
