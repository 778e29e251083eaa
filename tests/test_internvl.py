"""InternVL: InternViT with [CLS], tiles (dynamic + thumbnail) per image, pixel shuffle 2x2 -> 1 token.
Scores are pooled over each shuffle unit; an image's budget is split evenly over its tiles."""

import pytest
import torch
import transformers

import prune
from prune._tiny import INTERNVL_TOKENS, internvl_inputs, tiny_internvl
from tests.oracle import run_reduced
from tests.test_llm_methods import layer_loop

if not hasattr(transformers, "InternVLForConditionalGeneration"):  # an older release: the family is absent
    pytest.skip("no InternVLForConditionalGeneration in this transformers", allow_module_level=True)

GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
METHODS = ["random", "pool", "cls", "hiprune"]
LLM_METHODS = ["fastv", "pdrop", "transprune"]


@torch.no_grad()
def full_embeds(model, inputs):
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"].clone())

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


def select_rows(inputs, tiles, rows):
    out = {k: inputs[k][rows] for k in ("input_ids", "attention_mask")}
    first = int(out["attention_mask"].argmax(1).min())
    out = {k: v[:, first:] for k, v in out.items()}
    per_prompt = [sum(t) for t in tiles]
    starts = [sum(per_prompt[:r]) for r in range(len(tiles) + 1)]
    chosen = [i for r in rows for i in range(starts[r], starts[r + 1])]
    if chosen:
        out["pixel_values"] = inputs["pixel_values"][chosen]
    return out


@pytest.mark.parametrize("method", METHODS + LLM_METHODS)
def test_identity_at_keep_one(method):
    model = tiny_internvl(text_layers=4)
    inputs = internvl_inputs([[3, 1]], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, method, keep=1.0)
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", METHODS)
def test_oracle_prefill_and_generate(method, positions):
    model = tiny_internvl()
    inputs = internvl_inputs([[3, 1]], [12])  # an image of 2 tiles + thumbnail, an image of 1 tile
    prune.wrap(model, method, keep=0.25, positions=positions)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    assert [len(im.grids) for im in record.images] == [3, 1]
    if method != "pool":
        assert [im.tokens_after for im in record.images] == [12, 4]
        per_tile = record.images[0].kept.view(3, INTERNVL_TOKENS).sum(1).tolist()
        assert per_tile == [4, 4, 4]  # the budget split evenly over the tiles
    keep = record.keep_mask[0]
    prune.unwrap(model)
    embeds = full_embeds(model, inputs)[0]
    if method == "pool":
        for im in record.images:
            embeds[im.positions[im.kept]] = im.merged
    pos = torch.arange(keep.numel())[keep] if positions == "original" else torch.arange(int(keep.sum()))
    ref_logits, ref_tokens = run_reduced(model, embeds[keep], pos)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens


def test_cls_scores_are_pooled_over_each_shuffle_unit():
    """cls (FasterVLM: the feature layer's [CLS] row) keeps, per tile, the top tokens of the [CLS]
    attention averaged over each 2x2 unit, read here from eager output_attentions."""
    model = tiny_internvl()
    inputs = internvl_inputs([[2]], [6], seed=3)
    with torch.no_grad():
        att = model.model.vision_tower(
            pixel_values=inputs["pixel_values"], output_attentions=True
        ).attentions[-1]
        prune.wrap(model, "cls", keep=8)
        model(**inputs)
    cls_row = att.mean(1)[:, 0, 1:].view(-1, 1, 8, 8)  # (tiles, 1, 8, 8) head mean
    unit = torch.nn.functional.avg_pool2d(cls_row, 2).flatten(1)  # (tiles, 16)
    kept = model.prune_state.last.images[0].kept.view(2, INTERNVL_TOKENS)
    for tile in range(2):
        expected = set(torch.topk(unit[tile], 4).indices.tolist())
        assert set(torch.nonzero(kept[tile], as_tuple=True)[0].tolist()) == expected


@pytest.mark.parametrize("method", ["hiprune", "pool"])
def test_batch_equals_singles(method):
    tiles = [[1], [3, 1], [], [2]]
    inputs = internvl_inputs(tiles, [5, 14, 9, 20], seed=4)
    model = prune.wrap(tiny_internvl(), method, keep=0.4)
    with torch.no_grad():
        out = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        batch_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        batch_kept = model.prune_state.last.keep_mask
        for row in range(len(tiles)):
            single = select_rows(inputs, tiles, [row])
            o = model.generate(**single, **GEN, return_dict_in_generate=True, output_logits=True)
            assert o.sequences[0, single["input_ids"].shape[1] :].tolist() == batch_tokens[row].tolist()
            torch.testing.assert_close(o.logits[0][0], out.logits[0][row], atol=1e-4, rtol=1e-4)
            kept = model.prune_state.last.keep_mask[0]
            assert batch_kept[row, -kept.numel() :].tolist() == kept.tolist()


def test_eager_and_sdpa_agree():
    inputs = internvl_inputs([[1], [2, 1]], [4, 10])
    results = {}
    for attn in ("eager", "sdpa"):
        model = prune.wrap(tiny_internvl(attn_implementation=attn), "hiprune", keep=0.3)
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
        results[attn] = (model.prune_state.last.keep_mask, logits, tokens)
    assert torch.equal(results["eager"][0], results["sdpa"][0])
    torch.testing.assert_close(results["eager"][1][:, -1], results["sdpa"][1][:, -1], atol=1e-4, rtol=1e-4)
    assert torch.equal(results["eager"][2], results["sdpa"][2])


@pytest.mark.parametrize("method", LLM_METHODS)
def test_llm_methods_oracle_and_batch(method):
    tiles = [[1], [2, 1], []]
    inputs = internvl_inputs(tiles, [5, 14, 9], seed=2)
    model = prune.wrap(tiny_internvl(text_layers=8), method, keep=0.45)
    positions = model.prune_state.positions
    with torch.no_grad():
        batch_tokens = model.generate(**inputs, **GEN)[:, inputs["input_ids"].shape[1] :]
        for row in range(len(tiles)):
            single = select_rows(inputs, tiles, [row])
            tokens = model.generate(**single, **GEN)[0, single["input_ids"].shape[1] :]
            assert tokens.tolist() == batch_tokens[row].tolist()
        single = select_rows(inputs, tiles, [1])
        logits = model(**single).logits[0]
        record = model.prune_state.last
        generated = model.generate(**single, **GEN)[0, single["input_ids"].shape[1] :].tolist()
    assert len(record.layer_masks) >= 2
    prune.unwrap(model)
    embeds = full_embeds(model, single)
    ref_logits, ref_tokens = layer_loop(model, embeds, torch.arange(embeds.shape[1])[None], record, positions)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens


def test_bad_input_is_refused():
    model = tiny_internvl()
    with pytest.raises(ValueError, match="keep"):
        prune.wrap(model, "hiprune", keep=1.5)
    model.config.downsample_ratio = 0.25
    with pytest.raises(ValueError, match="pixel shuffle"):
        prune.wrap(model, "hiprune", keep=0.3)
    model.config.downsample_ratio = 0.5
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="select_strategy"):
        prune.wrap(model, "cls", keep=0.3)
    assert not hasattr(model, "prune_state")


def test_unwrap_restores():
    model = tiny_internvl()
    inputs = internvl_inputs([[3, 1]], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, "cls", keep=0.3)
        model.generate(**inputs, **GEN)
        prune.unwrap(model)
        out = model(**inputs).logits
    assert "get_image_features" not in model.model.__dict__
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
