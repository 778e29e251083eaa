"""LLaVA-NeXT-Video: LLaVA-NeXT's anyres images plus video frames pooled 2x2 after CLIP. Each frame is
a view of its pooled grid; a pooled token's score is the mean over the patches it pools. The oracle
runs the unwrapped language model on the reduced embeddings and positions."""

import pytest
import torch
import transformers

import prune
from prune._tiny import next_video_inputs, tiny_llava_next_video
from tests.oracle import run_reduced
from tests.test_llm_methods import layer_loop

if not hasattr(transformers, "LlavaNextVideoForConditionalGeneration"):
    pytest.skip("no LlavaNextVideoForConditionalGeneration in this transformers", allow_module_level=True)

GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
METHODS = ["random", "pool", "cls", "hiprune"]
LLM_METHODS = ["fastv", "pdrop", "transprune"]
KINDS = {
    "image": [("image", (16, 40))],
    "2 images": [("image", (16, 16)), ("image", (30, 16))],
    "video": [("video", 3)],
    "image+video": [("image", (16, 40)), ("video", 3)],
}


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


def select_rows(prompts, inputs, rows):
    out = {k: inputs[k][rows] for k in ("input_ids", "attention_mask")}
    first = int(out["attention_mask"].argmax(1).min())
    out = {k: v[:, first:] for k, v in out.items()}
    for kind, keys in (("image", ("pixel_values", "image_sizes")), ("video", ("pixel_values_videos",))):
        owners = [r for r, items in enumerate(prompts) for k, _ in items if k == kind]
        chosen = [i for i, r in enumerate(owners) if r in rows]
        if chosen:
            out.update({key: inputs[key][chosen] for key in keys})
    return out


@pytest.mark.parametrize("method", METHODS + LLM_METHODS)
def test_identity_at_keep_one(method):
    model = tiny_llava_next_video(text_layers=4)
    inputs = next_video_inputs(model, [KINDS["image+video"]], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, method, keep=1.0)
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_oracle_prefill_and_generate(method, kind, positions):
    model = tiny_llava_next_video()
    inputs = next_video_inputs(model, [KINDS[kind]], [11])
    prune.wrap(model, method, keep=0.3, positions=positions)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    assert [im.modality for im in record.images] == [k for k, _ in KINDS[kind]]
    for im in record.images:
        if im.modality == "video":
            assert im.grids == [(4, 4)] * 3 and im.tokens_before == 48
            if method != "pool":  # the budget spread over the frames: 14 = 5 + 5 + 4
                assert sorted(im.view_masks()[f].sum().item() for f in range(3)) == [4, 5, 5]
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


def test_video_scores_are_pooled_like_the_frames():
    """cls on a video: per frame, the top tokens of the feature layer's [CLS] attention averaged over
    each 2x2 pooling cell (read here from eager output_attentions)."""
    model = tiny_llava_next_video()
    inputs = next_video_inputs(model, [KINDS["video"]], [6], seed=3)
    videos = inputs["pixel_values_videos"]
    with torch.no_grad():
        att = model.model.vision_tower(videos.flatten(0, 1), output_attentions=True).attentions[-2]
        prune.wrap(model, "cls", keep=12)
        model(**inputs)
    cls_row = att.mean(1)[:, 0, 1:].view(-1, 1, 8, 8)  # (frames, 1, 8, 8) head mean, feature layer -2
    cell = torch.nn.functional.avg_pool2d(cls_row, 2).flatten(1)  # (frames, 16)
    masks = model.prune_state.last.images[0].view_masks()
    for frame in range(3):
        expected = set(torch.topk(cell[frame], 4).indices.tolist())
        assert set(torch.nonzero(masks[frame], as_tuple=True)[0].tolist()) == expected


@pytest.mark.parametrize("pool", ["max", "conv"])
def test_other_pool_modes_prune_per_frame(pool):
    model = tiny_llava_next_video(pool=pool)
    inputs = next_video_inputs(model, [KINDS["video"]], [9])
    prune.wrap(model, "hiprune", keep=0.5, positions="original")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
    assert record.images[0].tokens_after == 24
    keep = record.keep_mask[0]
    prune.unwrap(model)
    embeds = full_embeds(model, inputs)[0]
    ref, _ = run_reduced(model, embeds[keep], torch.arange(keep.numel())[keep], steps=0)
    torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", ["hiprune", "pool", "random"])
def test_batch_equals_singles(method):
    prompts = [KINDS["image"], [], KINDS["video"], KINDS["image+video"], KINDS["2 images"]]
    model = tiny_llava_next_video()
    inputs = next_video_inputs(model, prompts, [5, 14, 9, 20, 7], seed=4)
    prune.wrap(model, method, keep=0.4)
    with torch.no_grad():
        out = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        batch_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        batch_kept = model.prune_state.last.keep_mask
        for row in range(len(prompts)):
            single = select_rows(prompts, inputs, [row])
            o = model.generate(**single, **GEN, return_dict_in_generate=True, output_logits=True)
            assert o.sequences[0, single["input_ids"].shape[1] :].tolist() == batch_tokens[row].tolist()
            torch.testing.assert_close(o.logits[0][0], out.logits[0][row], atol=1e-4, rtol=1e-4)
            kept = model.prune_state.last.keep_mask[0]
            assert batch_kept[row, -kept.numel() :].tolist() == kept.tolist()


def test_eager_and_sdpa_agree():
    results = {}
    for attn in ("eager", "sdpa"):
        model = tiny_llava_next_video(attn_implementation=attn)
        inputs = next_video_inputs(model, [KINDS["image+video"], KINDS["video"]], [4, 10])
        prune.wrap(model, "hiprune", keep=0.3)
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
        results[attn] = (model.prune_state.last.keep_mask, logits, tokens)
    assert torch.equal(results["eager"][0], results["sdpa"][0])
    torch.testing.assert_close(results["eager"][1][:, -1], results["sdpa"][1][:, -1], atol=1e-4, rtol=1e-4)
    assert torch.equal(results["eager"][2], results["sdpa"][2])


@pytest.mark.parametrize("method", LLM_METHODS)
def test_llm_methods_oracle_and_batch(method):
    prompts = [KINDS["image"], KINDS["image+video"], []]
    model = tiny_llava_next_video(text_layers=8)
    inputs = next_video_inputs(model, prompts, [5, 14, 9], seed=2)
    prune.wrap(model, method, keep=0.45)
    positions = model.prune_state.positions
    with torch.no_grad():
        batch_tokens = model.generate(**inputs, **GEN)[:, inputs["input_ids"].shape[1] :]
        for row in range(len(prompts)):
            single = select_rows(prompts, inputs, [row])
            tokens = model.generate(**single, **GEN)[0, single["input_ids"].shape[1] :]
            assert tokens.tolist() == batch_tokens[row].tolist()
        single = select_rows(prompts, inputs, [1])
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
    model = tiny_llava_next_video()
    model.config.spatial_pool_stride = 3
    with pytest.raises(ValueError, match="spatial_pool_stride"):
        prune.wrap(model, "hiprune", keep=0.3)
    model.config.spatial_pool_stride = 2
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="select_strategy"):
        prune.wrap(model, "cls", keep=0.3)
    assert not hasattr(model, "prune_state")


def test_unwrap_restores():
    model = tiny_llava_next_video()
    inputs = next_video_inputs(model, [KINDS["image+video"]], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, "hiprune", keep=0.3)
        model.generate(**inputs, **GEN)
        prune.unwrap(model)
        out = model(**inputs).logits
    assert not any(k in model.model.__dict__ for k in ("get_image_features", "get_video_features"))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
