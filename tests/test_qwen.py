"""Qwen2-VL and Qwen2.5-VL: images, several images, video, image + video; M-RoPE-correct generation."""

import pytest
import torch

import prune
from prune._tiny import qwen_media, qwen_prompts, tiny_qwen_vl
from tests.oracle import qwen_full_inputs, run_reduced_mrope

GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
VERSIONS = ["2.5", "2"]
METHODS = ["random", "pool", "hiprune"]
KINDS = {
    "image": [("image", (1, 8, 12))],
    "2 images": [("image", (1, 8, 8)), ("image", (1, 12, 8))],
    "video": [("video", (2, 8, 8))],
    "image+video": [("image", (1, 8, 12)), ("video", (2, 8, 8))],
}


def make_inputs(prompts, text_lens, seed=0, build=qwen_prompts):
    """prompts: per prompt a list of (kind, (t, h, w)); media of each kind in prompt order.
    ``build``: the prompt builder (``qwen3_prompts`` for Qwen3-VL / Qwen3.5)."""
    inputs = build(prompts, text_lens, seed=seed)
    for kind, pv_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
        grids = [g for items in prompts for k, g in items if k == kind]
        if grids:
            inputs[pv_key], inputs[grid_key] = qwen_media(grids, seed=seed + len(kind))
    return inputs


def select_rows(prompts, inputs, rows):
    """The inputs of some prompts of a batch, with all-padding columns dropped."""
    out = {k: inputs[k][rows] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    first = int(out["attention_mask"].argmax(1).min())
    out = {k: v[:, first:] for k, v in out.items()}
    for kind, pv_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
        items = [(r, g) for r, p in enumerate(prompts) for k, g in p if k == kind]
        if not items:
            continue
        sizes = [t * h * w for _, (t, h, w) in items]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        chosen = [i for i, (r, _) in enumerate(items) if r in rows]
        if chosen:
            out[pv_key] = torch.cat([inputs[pv_key][starts[i] : starts[i] + sizes[i]] for i in chosen])
            out[grid_key] = inputs[grid_key][chosen]
    return out


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_keep_one(version, method):
    model = tiny_qwen_vl(version)
    inputs = make_inputs([KINDS["image+video"]], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, method, keep=1.0)
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_oracle_prefill_and_generate(version, method, kind):
    model = tiny_qwen_vl(version)
    inputs = make_inputs([KINDS[kind]], [11])
    prune.wrap(model, method, keep=0.3)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    assert record.positions == "original"
    assert {im.modality for im in record.images} == {k for k, _ in KINDS[kind]}
    keep = record.keep_mask[0]
    for im in record.images:
        assert im.tokens_after == round(0.3 * im.tokens_before) or method == "pool"
    prune.unwrap(model)
    embeds, positions = qwen_full_inputs(model, inputs)
    embeds = embeds[0]
    if method == "pool":
        for im in record.images:
            embeds[im.positions[im.kept]] = im.merged
    # kept tokens keep their original (t, h, w) ids
    assert torch.equal(record.position_ids[-3:, 0], positions[:, 0, keep])
    ref_logits, ref_tokens = run_reduced_mrope(model, embeds[keep], positions[:, 0, keep])
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_singles(version, method):
    prompts = [
        [("image", (1, 8, 12))],
        [("image", (1, 12, 8)), ("video", (2, 8, 8))],
        [],
        [("video", (2, 4, 8))],
    ]
    inputs = make_inputs(prompts, [5, 14, 9, 20], seed=4)
    model = prune.wrap(tiny_qwen_vl(version), method, keep=0.4)
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


@pytest.mark.parametrize("version", VERSIONS)
def test_eager_and_sdpa_agree(version):
    inputs = make_inputs([KINDS["image+video"]], [9])
    results = {}
    for attn in ("eager", "sdpa"):
        model = prune.wrap(tiny_qwen_vl(version, attn_implementation=attn), "hiprune", keep=0.3)
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
        results[attn] = (model.prune_state.last.keep_mask, logits, tokens)
    assert torch.equal(results["eager"][0], results["sdpa"][0])
    torch.testing.assert_close(results["eager"][1], results["sdpa"][1], atol=1e-4, rtol=1e-4)
    assert torch.equal(results["eager"][2], results["sdpa"][2])


def test_cls_and_compact_are_refused():
    model = tiny_qwen_vl("2.5")
    with pytest.raises(ValueError, match="needs a \\[CLS\\] token.*hiprune"):
        prune.wrap(model, "cls", keep=0.3)
    with pytest.raises(ValueError, match="positions='compact' is not supported"):
        prune.wrap(model, "hiprune", keep=0.3, positions="compact")
    assert not hasattr(model, "prune_state")


def test_unwrap_restores(version="2.5"):
    model = tiny_qwen_vl(version)
    inputs = make_inputs([KINDS["image+video"]], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, "hiprune", keep=0.3)
        model(**inputs)
        prune.unwrap(model)
        out = model(**inputs).logits
    assert not any(k in model.model.__dict__ for k in ("get_image_features", "get_video_features"))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
