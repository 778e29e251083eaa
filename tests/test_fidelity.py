"""Kept sets equal the reference algorithms of METHODS.md, computed here from eager
``output_attentions`` of the same model on the same image (written independently of prune)."""

import pytest
import torch

import prune
from prune._tiny import tiny_llava


def _attentions(model, pixel_values):
    """Per layer (images, heads, N+1, N+1) from the eager vision tower."""
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values, output_attentions=True)
    return out.attentions


def _kept_patches(model, pixel_values, method, keep, **options):
    """Patch indices (per image) that prune kept, read off keep_mask."""
    side = model.config.vision_config.image_size // model.config.vision_config.patch_size
    n = side * side
    ids = torch.tensor([[1, 5, 6] + [model.config.image_token_id] * n * pixel_values.shape[0] + [7, 8]])
    prune.wrap(model, method, keep=keep, **options)
    with torch.no_grad():
        model(input_ids=ids, pixel_values=pixel_values)
    mask = model.prune_state.last.keep_mask[0, 3 : 3 + n * pixel_values.shape[0]].view(-1, n)
    prune.unwrap(model)
    return [set(torch.nonzero(row).view(-1).tolist()) for row in mask]


def _feature_layer(model, atts):
    """The encoder layer LLaVA reads (hidden_states[k] is layer k-1's output): -2 -> L-2, -1 -> L-1."""
    return len(atts) + model.config.vision_feature_layer


def _topk(scores, k):
    return torch.topk(scores, k).indices.tolist()


def _fastervlm(atts, image, layer, budget):
    score = atts[layer][image].mean(0)[0, 1:]  # CLS row, head mean, CLS column dropped
    return set(_topk(score, budget))


def _vtc(atts, image, start, budget):
    last = len(atts) - 1
    score = sum(atts[layer][image].mean(0)[0, 1:] for layer in range(start, last))
    return set(_topk(score, budget))


def _hiprune(atts, image, obj, deep_layer, budget, width, alpha=0.1, wrap=True):
    n = atts[0].shape[-1] - 1
    shallow = atts[obj][image].mean(0).mean(0)[1:]
    deep = atts[deep_layer][image].mean(0).mean(0)[1:].clone()
    n_anchor = round(budget * alpha / 5)
    anchors = torch.topk(shallow, n_anchor).indices
    neigh = [anchors, anchors - width, anchors + width]
    if wrap:
        neigh += [anchors - 1, anchors + 1]
    else:
        neigh += [anchors[anchors % width != 0] - 1, anchors[anchors % width != width - 1] + 1]
    chosen = torch.unique(torch.cat(neigh).clamp(0, n - 1))
    deep[chosen] -= 1.0  # the reference's way to exclude them
    registers = torch.topk(deep, budget - chosen.numel()).indices
    return set(chosen.tolist()) | set(registers.tolist())


@pytest.fixture(scope="module", params=["clip", "dinov2"])
def big(request):
    # 12x12 grid and 6 layers so that layers differ and HiPrune has anchors (T >= 25).
    # dinov2: the proxy VLM's encoder family (features from the last layer, not -2).
    model = tiny_llava(image_size=48, patch=4, vision_layers=6, vision_hidden=32, seed=1, vision=request.param)
    pixel_values = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(5))
    return model, pixel_values


@pytest.mark.parametrize("keep", [0.5, 0.25, 10])
def test_cls_fastervlm_matches_reference(big, keep):
    model, pv = big
    atts = _attentions(model, pv)
    kept = _kept_patches(model, pv, "cls", keep)
    budget = keep if isinstance(keep, int) else round(keep * 144)
    for image in range(2):
        assert kept[image] == _fastervlm(atts, image, _feature_layer(model, atts), budget)


@pytest.mark.parametrize("start", [2, 3])
def test_cls_vtc_matches_reference(big, start):
    model, pv = big
    atts = _attentions(model, pv)
    kept = _kept_patches(model, pv, "cls", 0.3, variant="vtc", start=start)
    for image in range(2):
        assert kept[image] == _vtc(atts, image, start, round(0.3 * 144))


@pytest.mark.parametrize("keep", [0.5, 0.33, 0.2])
@pytest.mark.parametrize("wrap_rows", [True, False])
def test_hiprune_matches_reference(big, keep, wrap_rows):
    model, pv = big
    atts = _attentions(model, pv)
    kept = _kept_patches(model, pv, "hiprune", keep, object_layer=1, wrap_rows=wrap_rows, alpha=0.5)
    budget = round(keep * 144)
    for image in range(2):
        expected = _hiprune(atts, image, 1, _feature_layer(model, atts), budget, width=12, alpha=0.5, wrap=wrap_rows)
        assert kept[image] == expected
        assert len(kept[image]) == budget


def test_hiprune_default_layers_follow_reference_on_clip_depth():
    from prune.methods import EncoderInfo, get_method

    method = get_method("hiprune")()
    reqs = method.bind(EncoderInfo(num_layers=24, feature_layer=22, has_cls=True, family="llava"))
    assert [r.layer for r in reqs] == [8, 22]  # OBJECT_LAYER=9 (1-based) and layer -2
    cls = get_method("cls")(variant="vtc")
    assert [r.layer for r in cls.bind(EncoderInfo(24, 22, True, "llava"))] == list(range(16, 23))


# ---- the real LLaVA-1.5 layout: CLIP-L/14-336, 24 layers, 576 patches, the references' budgets --------
@pytest.fixture(scope="module")
def clip_l():
    model = tiny_llava(image_size=336, patch=14, vision_layers=24, vision_hidden=32, seed=9)
    pixel_values = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(10))
    return model, pixel_values, _attentions(model, pixel_values)


@pytest.mark.parametrize("budget", [192, 128, 64])
def test_clip_l_layout_matches_the_references(clip_l, budget):
    model, pv, atts = clip_l
    assert len(atts) == 24 and atts[0].shape[-1] == 577
    feature = _feature_layer(model, atts)  # 22: layer -2
    for method, options, reference in (
        ("cls", {}, lambda i: _fastervlm(atts, i, feature, budget)),
        ("cls", {"variant": "vtc"}, lambda i: _vtc(atts, i, 16, budget)),  # VTC-CLS default start 16
        ("hiprune", {}, lambda i: _hiprune(atts, i, 8, feature, budget, width=24)),  # OBJECT_LAYER=9, alpha 0.1
    ):
        kept = _kept_patches(model, pv, method, budget, **options)
        for image in range(2):
            assert kept[image] == reference(image), (method, options)
