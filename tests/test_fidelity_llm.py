"""PyramidDrop and TransPrune keep the token sets of their reference code, on the real layouts.

The references here are written for these tests from the behaviour of the public repositories
(Cooperx521/PyramidDrop ``modeling_llama_pdrop.py``, ``pdrop_rank_drop``; liaolea/TransPrune
``modeling_llama_transprune.py``): a layer loop over the unwrapped language model that, after layer
K-1 has run, computes layer K's ``input_layernorm`` + q/k projections + RoPE on the uncut sequence,
ranks the vision tokens, keeps ``int(n0 * ratio)`` of the prompt's original ``n0`` and renumbers
positions (compact). PyramidDrop ranks by the last prompt token's row (head mean); TransPrune by
TTV / sum + IGA / sum, TTV accumulated over ranks 7..12 and carried with the kept tokens.

Layouts: LLaVA-1.5 (CLIP-L/14-336: 24 encoder layers, 576 patches) and LLaVA-NeXT with its real
pinpoints (a 340x480 image: 2242 vision tokens, newlines included), both on a 32-layer LM.
"""

import math

import pytest
import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import prune
from prune._tiny import IMAGE_TOKEN, PAD_TOKEN, _text, _vision, tiny_llava
from tests.oracle import full_inputs_embeds

PDROP = [(8, 0.5), (16, 0.25), (24, 0.125)]  # the reference's layer_list / image_token_ratio_list
TRANSPRUNE = [(7, 0.875), (9, 0.625), (12, 0.125)]
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _causal(n):
    return torch.full((n, n), float("-inf")).triu(1)[None, None]


def _transition(before, after):
    """The reference's per-token transformation weight of one sub-layer (softmax over the sequence)."""
    ratio = after.norm(dim=-1) / before.norm(dim=-1)
    necc = torch.exp(1 - torch.nn.functional.cosine_similarity(before, after, dim=-1))
    return ratio * necc / necc.sum()


@torch.no_grad()
def reference_stages(model, embeds, start, n0, stages, method, accumulate=range(6, 12)):
    """{cut layer: set of original columns of the vision tokens that layer sees}. One prompt, no padding."""
    lm = model.model.language_model
    hidden = embeds
    cols = torch.arange(embeds.shape[1])
    n = n0
    cuts = {layer: ratio for layer, ratio in stages}
    ttv = []  # per accumulated layer: (L_current,) weights, carried with the kept rows
    out = {}
    for i, layer in enumerate(lm.layers):
        length = hidden.shape[1]
        pos = torch.arange(length)[None]
        grabbed = {}
        if method == "transprune" and i in accumulate:
            hooks = [m.register_forward_hook(lambda mod, a, o, k=k, g=grabbed: g.__setitem__(k, o[0] if isinstance(o, tuple) else o))
                     for k, m in (("ai", layer.input_layernorm), ("ao", layer.self_attn),
                                  ("mi", layer.post_attention_layernorm), ("mo", layer.mlp))]
        hidden = layer(hidden, attention_mask=_causal(length), position_embeddings=lm.rotary_emb(hidden, pos))
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        if grabbed:
            for h in hooks:
                h.remove()
            ttv.append(_transition(grabbed["ai"][0], grabbed["ao"][0]) + _transition(grabbed["mi"][0], grabbed["mo"][0]))
        if i + 1 not in cuts:
            continue
        nxt = lm.layers[i + 1]
        x = nxt.input_layernorm(hidden)
        attn = nxt.self_attn
        d = attn.head_dim
        q = attn.q_proj(x).view(1, length, -1, d).transpose(1, 2)
        k = attn.k_proj(x).view(1, length, -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *lm.rotary_emb(x, pos))
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        rows = torch.arange(length - 1, length) if method == "pdrop" else torch.arange(start + n, length)
        logits = q[:, :, rows] @ k.transpose(-1, -2) / math.sqrt(d) + _causal(length)[:, :, rows]
        attention = logits.softmax(-1).mean(1)[0][:, start : start + n].mean(0)  # head mean, then row mean
        if method == "pdrop":
            score = attention
        else:
            acc = sum(w[start : start + n] for w in ttv)
            score = acc / (acc.sum() + 1e-8) + attention / (attention.sum() + 1e-8)
        keep_n = int(n0 * cuts[i + 1])
        top = torch.topk(score, keep_n).indices.sort().values + start
        keep = torch.cat([torch.arange(start), top, torch.arange(start + n, length)])
        hidden, cols = hidden[:, keep], cols[keep]
        ttv = [w[keep] for w in ttv]
        n = keep_n
        out[i + 1] = set(cols[start : start + n].tolist())
    return out


def _prune_stages(model, inputs, method, schedule, **options):
    prune.wrap(model, method, schedule=schedule, **options)
    with torch.no_grad():
        model(**inputs)
    record = model.prune_state.last
    prune.unwrap(model)
    vision = inputs["input_ids"][0] == IMAGE_TOKEN
    return {layer: set(torch.nonzero(record.seen_by(layer)[0] & vision, as_tuple=True)[0].tolist()) for layer, _ in schedule}


def _text_ids(n_vision, seed):
    gen = torch.Generator().manual_seed(seed)
    before = torch.randint(3, 100, (5,), generator=gen).tolist()
    after = torch.randint(3, 100, (12,), generator=gen).tolist()
    ids = torch.tensor([[1, *before, *([IMAGE_TOKEN] * n_vision), *after]])
    return ids, 1 + len(before)


@pytest.fixture(scope="module")
def llava15():
    model = tiny_llava(image_size=336, patch=14, vision_layers=24, text_layers=32, seed=3)
    ids, start = _text_ids(576, seed=4)
    pv = torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(5))
    return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pv}, start, 576


def tiny_llava_next_real(seed=0):
    """LLaVA-NeXT with the released checkpoints' pinpoints and CLIP-L/14-336 patch layout (tiny widths)."""
    torch.manual_seed(seed)
    config = LlavaNextConfig(vision_config=_vision(336, 14, 24, 32), text_config=_text(64, 32),
                             image_token_id=IMAGE_TOKEN, image_grid_pinpoints=PINPOINTS,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = "eager"
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()


@pytest.fixture(scope="module")
def llava_next():
    model = tiny_llava_next_real(seed=6)
    size = torch.tensor([[340, 480]])  # 2x2 crops, unpadded to 34 rows: 576 + 34 * 49 = 2242 tokens
    pv = torch.randn(1, 5, 3, 336, 336, generator=torch.Generator().manual_seed(7))
    ids, start = _text_ids(2242, seed=8)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pv, "image_sizes": size}
    with torch.no_grad():
        assert model.model.get_image_features(pixel_values=pv, image_sizes=size).pooler_output[0].shape[0] == 2242
    return model, inputs, start, 2242


@pytest.mark.parametrize("layout", ["llava15", "llava_next"])
@pytest.mark.parametrize("method,schedule", [("pdrop", PDROP), ("transprune", TRANSPRUNE)])
def test_in_llm_stages_match_reference(layout, method, schedule, request):
    model, inputs, start, n0 = request.getfixturevalue(layout)
    embeds = full_inputs_embeds(model, inputs)
    expected = reference_stages(model, embeds, start, n0, schedule, method)
    got = _prune_stages(model, inputs, method, schedule)
    for layer, ratio in schedule:
        assert len(got[layer]) == int(n0 * ratio)  # int(), not round(): 1961 of 2242 at 0.875
        assert got[layer] == expected[layer], f"{method} stage at layer {layer}"


def test_pdrop_does_not_rank_with_the_previous_layer(llava15):
    """The old rule (FastV's: layer K-1's attention) gives another set on this input: the test above
    can tell the two apart."""
    model, inputs, start, n0 = llava15
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[7][0]  # layer K-1 = 7, (H, L, L)
    old = set((torch.topk(att.mean(0)[-1, start : start + n0], n0 // 2).indices + start).tolist())
    assert _prune_stages(model, inputs, "pdrop", PDROP[:1])[8] != old


def test_kept_counts_use_the_reference_rounding():
    from prune.methods import get_method

    assert get_method("transprune")().kept_count(0.875, 2242) == 1961  # round() gave 1962
    assert get_method("pdrop")().kept_count(0.125, 2242) == 280
    assert get_method("fastv")().kept_count(0.5, 575) == 288  # FastV's reference rounds


@pytest.mark.parametrize("k,r", [(2, 0.5), (3, 0.5), (2, 0.75), (3, 0.75)])
def test_fastv_matches_reference(llava15, k, r):
    """FastV's reference: layer K-1's attention of the last token, head mean; keep round(n (1 - R))."""
    model, inputs, start, n0 = llava15
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[k - 1][0]  # layers < K see every token
    score = att.mean(0)[-1, start : start + n0]
    expected = set((torch.topk(score, round(n0 * (1 - r))).indices + start).tolist())
    prune.wrap(model, "fastv", layer=k, ratio=r, keep=0.5)  # (K, R) given: keep is not used
    with torch.no_grad():
        model(**inputs)
    record = model.prune_state.last
    prune.unwrap(model)
    vision = inputs["input_ids"][0] == IMAGE_TOKEN
    assert set(torch.nonzero(record.seen_by(k)[0] & vision, as_tuple=True)[0].tolist()) == expected
