"""The references' quirks, offered as options, reproduce the references' token sets; the defaults
keep the budget contract.

References written here from the repositories' behaviour (Danielement321/HiPrune: the Qwen2.5-VL
path in ``qwen2_5_vl_HiPrune.py`` and the LLaVA fork's ``encode_images``; Theia-4869/FasterVLM's
``encode_images``): per block eager attention, head mean, query sum (Qwen) or mean (LLaVA); the
forks' LLaVA-NeXT ``mm_patch_merge_type = "spatial"``: every view's 576 patches ranked on their
own, ``int(T / views)`` each (HiPrune) or T each (FasterVLM).
"""

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

import prune
from prune._tiny import qwen_media, qwen_prompts, tiny_qwen_vl
from prune.methods import View, get_method
from prune.methods.base import EncoderInfo
from tests.test_fidelity import _fastervlm, _hiprune
from tests.test_fidelity_llm import tiny_llava_next_real

FULL = [7, 15, 23, 31]  # Qwen2.5-VL-7B's full-attention blocks


# ---- HiPrune on Qwen2.5-VL: the reference's "- 1" on query-summed attention ---------------------------
def _received_sum(attn, hidden, cu_seqlens, pos_emb):
    n = hidden.shape[0]
    qkv = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
    q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], *pos_emb)
    out = []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs, ks = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1)
        out.append(torch.softmax(qs @ ks.transpose(1, 2) * attn.scaling, dim=-1).mean(0).sum(0))  # heads, queries
    return torch.cat(out)


def _qwen_reference(shallow, deep, budget, width, alpha):
    """The Qwen path of the reference: S = anchors + buffers; deep -= 1 on S; top-(T - |S|) of all."""
    n = shallow.numel()
    anchors = torch.topk(shallow, round(budget * alpha / 5)).indices
    chosen = torch.unique(torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1))
    mask = torch.zeros(n, dtype=torch.int32)
    mask[chosen] = 1
    registers = torch.topk(deep - mask, budget - chosen.numel()).indices
    return set(chosen.tolist()) | set(registers.tolist())


@pytest.fixture(scope="module")
def qwen32():
    model = tiny_qwen_vl("2.5", depth=32, fullatt=FULL, seed=11)
    with torch.no_grad():  # a peaked last block: a few tokens receive far more than 1.0 (as real deep layers do)
        qkv = model.model.visual.blocks[31].attn.qkv
        qkv.weight[: 2 * qkv.weight.shape[1]] *= 40.0  # q and k rows
    grid = (1, 16, 20)
    pv, thw = qwen_media([grid], seed=12)
    inputs = qwen_prompts([[("image", grid)]], [6])
    inputs.update(pixel_values=pv, image_grid_thw=thw)
    seen = {}

    def hook(idx):
        def fn(module, args, kwargs):
            seen[idx] = (args[0] if args else kwargs["hidden_states"], kwargs["cu_seqlens"], kwargs["position_embeddings"])
        return fn

    visual = model.model.visual
    handles = [visual.blocks[i].attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i in (15, 31)]
    with torch.no_grad():
        model.model.get_image_features(pv, thw)
    for h in handles:
        h.remove()
    window_index, _ = get_vision_window_index(thw, spatial_merge_size=2, window_size=visual.window_size,
                                              patch_size=visual.patch_size, kwargs={})
    unpermute = torch.argsort(window_index)
    with torch.no_grad():
        scores = {i: _received_sum(visual.blocks[i].attn, *seen[i]).view(-1, 4).mean(1)[unpermute] for i in (15, 31)}
    return model, inputs, scores, grid


def _qwen_kept(model, inputs, keep, **options):
    prune.wrap(model, "hiprune", keep=keep, **options)
    with torch.no_grad():
        model(**inputs)
    record = model.prune_state.last.images[0]
    prune.unwrap(model)
    return record


@pytest.mark.parametrize("keep,alpha", [(0.334, 0.1), (0.112, 0.1), (0.5, 0.5), (0.5, 1.0)])
def test_hiprune_qwen_reference_exclusion_reproduces_the_reference(qwen32, keep, alpha):
    model, inputs, scores, (_, h, w) = qwen32
    n = h * w // 4
    budget = round(keep * n)
    expected = _qwen_reference(scores[15], scores[31], budget, w // 2, alpha)
    record = _qwen_kept(model, inputs, keep, alpha=alpha, exclusion="reference")
    assert set(torch.nonzero(record.kept).view(-1).tolist()) == expected
    assert record.budget == budget and record.selected == len(expected) and record.shortfall == budget - len(expected)
    default = _qwen_kept(model, inputs, keep, alpha=alpha)  # exact exclusion: always T
    assert default.selected == budget and default.shortfall == 0


def test_hiprune_qwen_reference_keeps_fewer_than_t(qwen32):
    """The case the option exists for: an anchor/buffer token strong in the deep block is picked
    twice, the image keeps fewer than T (the old code, exact only, always kept T)."""
    model, inputs, scores, (_, h, w) = qwen32
    record = _qwen_kept(model, inputs, 0.5, alpha=0.5, exclusion="reference")
    assert record.shortfall > 0
    assert scores[31].max() > 2.0  # the premise: query sums far above the 1.0 the reference subtracts


# ---- LLaVA-NeXT: the forks' per-view budgets ---------------------------------------------------------
@pytest.fixture(scope="module")
def next_model():
    model = tiny_llava_next_real(seed=21)
    return model


def _next_views(model, size, keep, method, **options):
    """Per view (base, crops) the set of patches prune kept, and the views' pixel attentions."""
    views = {(336, 672): 3, (672, 672): 5, (340, 480): 5}[size]
    pv = torch.randn(1, views, 3, 336, 336, generator=torch.Generator().manual_seed(sum(size)))
    sizes = torch.tensor([size])
    with torch.no_grad():
        n = model.model.get_image_features(pixel_values=pv, image_sizes=sizes).pooler_output[0].shape[0]
        atts = model.model.vision_tower(pv[0], output_attentions=True).attentions
    ids = torch.tensor([[1, 5, 6] + [model.config.image_token_id] * n + [7, 8]])
    prune.wrap(model, method, keep=keep, **options)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pv, image_sizes=sizes)
    record = model.prune_state.last.images[0]
    prune.unwrap(model)
    masks = record.view_masks()
    return [set(torch.nonzero(m).view(-1).tolist()) for m in masks], atts, record


@pytest.mark.parametrize("size", [(336, 672), (672, 672)])  # no unpadding: every patch of every view exists
@pytest.mark.parametrize("keep", [320, 158])
def test_hiprune_llava_next_floor_budgets_match_the_fork(next_model, size, keep):
    kept, atts, record = _next_views(next_model, size, keep, "hiprune", views="floor")
    views = len(kept)
    share = keep // views  # int(T / views): the remainder is lost
    for v in range(views):
        assert kept[v] == _hiprune(atts, v, 8, 22, share, width=24)
    assert record.view_budgets == [share] * views and record.shortfall == keep - share * views
    even, _, _ = _next_views(next_model, size, keep, "hiprune")  # prune's default gives the remainder away
    assert sum(map(len, even)) == keep
    assert (even == kept) == (keep % views == 0)  # equal only when T splits evenly


@pytest.mark.parametrize("size", [(336, 672), (672, 672)])
def test_fastervlm_llava_next_per_view_budget_matches_the_fork(next_model, size):
    kept, atts, record = _next_views(next_model, size, 58, "cls", views="per_view")
    for v in range(len(kept)):
        assert kept[v] == _fastervlm(atts, v, 22, 58)  # T per view, CLS row of layer -2
    assert record.view_budgets == [58] * len(kept) and record.selected == 58 * len(kept)


def test_padded_images_keep_only_patches_the_hf_layout_has(next_model):
    """On a padded image (340x480) the forks rank padding patches too, which Hugging Face's
    spatial_unpad layout drops: prune ranks the existing ones only (README: LLaVA-NeXT layout)."""
    kept, atts, record = _next_views(next_model, (340, 480), 320, "hiprune", views="floor")
    for v in range(len(record.grids)):
        exists = set(record.token_patch[record.token_view == v].tolist())
        assert kept[v] <= exists and len(kept[v]) == min(320 // 5, len(exists))


# ---- scores in the reference's dtype -----------------------------------------------------------------
def test_score_dtype_changes_the_set_at_a_tie():
    # patch 1 beats patch 3 in fp32 by less than fp16's step at 0.5: in fp16 they tie, the lower index wins
    score = torch.tensor([0.9, 0.5, 0.1, 0.50001, 0.2])
    view = View(grid=(1, 5), budget=2, valid=torch.ones(5, dtype=torch.bool), signals={"cls@0": score})
    info = EncoderInfo(num_layers=2, feature_layer=0, has_cls=True, family="llava")
    fp32, fp16 = (get_method("cls")(layer=0, score_dtype=d) for d in (None, "float16"))
    for m in (fp32, fp16):
        m.bind(info)
    assert fp32.select(view).keep.tolist() == [0, 3]
    assert fp16.select(view).keep.tolist() == [0, 1]
    pdrop = get_method("pdrop")(score_dtype="float16")
    assert torch.equal(pdrop.score(0, 8, {"iga@8": score[None]}), score.half().float()[None])
    with pytest.raises(ValueError, match="score_dtype"):
        get_method("hiprune")(score_dtype="fp16")


@pytest.mark.parametrize("method,options,error", [
    ("hiprune", {"exclusion": "approx"}, ValueError), ("hiprune", {"views": "per_view"}, ValueError),
    ("hiprune", {"alpha": "0.1"}, TypeError), ("hiprune", {"alpha": -1.0}, ValueError),
    ("hiprune", {"wrap_rows": 1}, TypeError), ("cls", {"views": "all"}, ValueError),
    ("cls", {"layer": 1.5}, TypeError),
])
def test_quirk_options_are_validated(method, options, error):
    with pytest.raises(error, match=next(iter(options))):
        get_method(method)(**options)
    assert set(options) <= set(get_method(method).defaults)  # listed, so `prune methods` shows them
