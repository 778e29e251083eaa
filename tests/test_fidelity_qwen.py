"""HiPrune on Qwen2.5-VL keeps the reference's token set, computed here from eager attention of
the object block and the last block: full softmax per segment, head mean, query sum, 2x2 mean,
window permutation undone."""

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision
from transformers.vision_utils import get_vision_window_index

import prune
from prune._tiny import qwen_media, qwen_prompts, tiny_qwen_vl


def _capture_inputs(model, blocks):
    seen = {}

    def hook(idx):
        def fn(module, args, kwargs):
            seen[idx] = (args[0] if args else kwargs["hidden_states"], kwargs["cu_seqlens"], kwargs["position_embeddings"])

        return fn

    handles = [model.model.visual.blocks[i].attn.register_forward_pre_hook(hook(i), with_kwargs=True) for i in blocks]
    return seen, handles


def _received(attn, hidden, cu_seqlens, pos_emb):
    n = hidden.shape[0]
    qkv = attn.qkv(hidden).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3)
    q, k = apply_rotary_pos_emb_vision(qkv[0], qkv[1], *pos_emb)
    out = []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        qs, ks = q[a:b].transpose(0, 1), k[a:b].transpose(0, 1)  # (H, n, d)
        probs = torch.softmax(qs @ ks.transpose(1, 2) * attn.scaling, dim=-1)  # the full matrix, on purpose
        out.append(probs.mean(0).sum(0))
    return torch.cat(out)


def _hiprune_reference(shallow, deep, budget, width, alpha):
    n = shallow.numel()
    anchors = torch.topk(shallow, round(budget * alpha / 5)).indices
    chosen = torch.unique(torch.cat([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width]).clamp(0, n - 1))
    deep = deep.clone()
    deep[chosen] -= 1e9
    return set(chosen.tolist()) | set(torch.topk(deep, budget - chosen.numel()).indices.tolist())


@pytest.mark.parametrize("keep", [0.5, 0.3])
def test_hiprune_qwen25_matches_reference(keep):
    model = tiny_qwen_vl("2.5", depth=4, seed=2)  # full attention at blocks 1 and 3
    grids = [(1, 16, 16), (1, 12, 20)]
    pv, thw = qwen_media(grids, seed=7)
    inputs = qwen_prompts([[("image", g) for g in grids]], [6])
    inputs.update(pixel_values=pv, image_grid_thw=thw)
    seen, handles = _capture_inputs(model, [1, 3])
    with torch.no_grad():
        model.model.get_image_features(pv, thw)
        for h in handles:
            h.remove()
        visual = model.model.visual
        window_index, _ = get_vision_window_index(thw, spatial_merge_size=2, window_size=visual.window_size,
                                                  patch_size=visual.patch_size, kwargs={})
        unpermute = torch.argsort(window_index)
        scores = {i: _received(visual.blocks[i].attn, *seen[i]).view(-1, 4).mean(1)[unpermute] for i in (1, 3)}
        prune.wrap(model, "hiprune", keep=keep, alpha=0.5)
        model(**inputs)
    record = model.prune_state.last
    first = 0
    for im, (_, h, w) in zip(record.images, grids):
        n = h * w // 4
        budget = round(keep * n)
        expected = _hiprune_reference(scores[1][first : first + n], scores[3][first : first + n], budget, w // 2, 0.5)
        kept = set(torch.nonzero(im.kept).view(-1).tolist())
        assert kept == expected
        first += n
