"""LLaVA-OneVision: anyres-max images (unpadded, downscaled), multi-image prompts and video."""

import pytest
import torch

import prune
from prune._tiny import OV_IMAGE, OV_VIDEO, tiny_llava_onevision
from tests.oracle import reduced_positions, run_reduced

GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
METHODS = ["random", "pool", "hiprune"]
SIZES = [(24, 60), (48, 46), (30, 24), (24, 24)]


def build(model, prompts, text_lens, seed=0):
    """prompts: per prompt a list of ("image", size index) / ("video", frames). Left padding."""
    gen = torch.Generator().manual_seed(seed)
    images = [SIZES[i] for p in prompts for k, i in p if k == "image"]
    videos = [f for p in prompts for k, f in p if k == "video"]
    inputs = {}
    with torch.no_grad():
        if images:
            inputs["pixel_values"] = torch.randn(len(images), 5, 3, 24, 24, generator=gen)
            inputs["image_sizes"] = torch.tensor(images)
            inputs["batch_num_images"] = torch.tensor([sum(k == "image" for k, _ in p) for p in prompts])
            feats = model.model.get_image_features(**inputs).pooler_output
            image_counts = iter(f.shape[0] for f in feats)
        if videos:
            assert len(set(videos)) == 1, "one frame count per batch"
            inputs["pixel_values_videos"] = torch.randn(len(videos), videos[0], 3, 24, 24, generator=gen)
            side = model.config.vision_config.image_size // model.config.vision_config.patch_size
            video_count = videos[0] * ((side + 1) // 2) ** 2 + 1  # pooled frames and one newline
    rows = []
    for items, n_text in zip(prompts, text_lens):
        row = [1] + torch.randint(3, 100, (n_text,), generator=gen).tolist()
        for kind, _ in items:
            row += [OV_IMAGE] * next(image_counts) if kind == "image" else [OV_VIDEO] * video_count
            row += torch.randint(3, 100, (2,), generator=gen).tolist()
        rows.append(row)
    length = max(map(len, rows))
    inputs["input_ids"] = torch.zeros(len(rows), length, dtype=torch.long)
    inputs["attention_mask"] = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        inputs["input_ids"][b, length - len(row) :] = torch.tensor(row)
        inputs["attention_mask"][b, length - len(row) :] = 1
    return inputs


KINDS = {
    "image": [("image", 0)],
    "2 images": [("image", 1), ("image", 2)],
    "video": [("video", 3)],
    "image+video": [("image", 1), ("video", 3)],
}


@torch.no_grad()
def full_embeds(model, inputs):
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if "pixel_values" in inputs:
        feats = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"],
            batch_num_images=inputs["batch_num_images"]).pooler_output
        embeds = embeds.masked_scatter((ids == OV_IMAGE).unsqueeze(-1), torch.cat(list(feats)))
    if "pixel_values_videos" in inputs:
        feats = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output
        if feats.shape[1] % inputs["pixel_values_videos"].shape[1] == 0:  # transformers < 5.2x adds the newline later
            feats = torch.cat([feats, model.model.image_newline[None, None].expand(feats.shape[0], 1, -1)], 1)
        feats = feats.flatten(0, 1)
        embeds = embeds.masked_scatter((ids == OV_VIDEO).unsqueeze(-1), feats)
    return embeds


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_keep_one(method):
    model = tiny_llava_onevision(aspect="anyres_max_1")
    inputs = build(model, [KINDS["image+video"]], [7])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, method, keep=1.0)
        torch.testing.assert_close(model(**inputs).logits, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_oracle_prefill_and_generate(method, kind, positions):
    model = tiny_llava_onevision(aspect="anyres_max_1")  # the larger image is downscaled
    inputs = build(model, [KINDS[kind]], [9])
    prune.wrap(model, method, keep=0.35, positions=positions)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    keep = record.keep_mask[0]
    assert record.vision_tokens_after < record.vision_tokens_before
    prune.unwrap(model)
    embeds = full_embeds(model, inputs)[0]
    if method == "pool":
        for im in record.images:
            embeds[im.positions[im.kept]] = im.merged
    ref_logits, ref_tokens = run_reduced(model, embeds[keep], reduced_positions(keep, positions))
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens


def test_newlines_kept_and_budget_split_by_size():
    model = prune.wrap(tiny_llava_onevision(aspect="anyres_max_1"), "hiprune", keep=0.25)
    inputs = build(model, [[("image", 0)]], [5])
    with torch.no_grad():
        model(**inputs)
    im = model.prune_state.last.images[0]
    assert im.grids == [(6, 6), (3, 10)]  # base grid and the unpadded crop grid
    newline = im.scores["score"].isnan()
    assert int(newline.sum()) == 3 and bool(im.kept[newline].all())
    assert im.budget == round(0.25 * 66) and int(im.kept[~newline].sum()) == im.budget


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_singles(method):
    prompts = [[("image", 0)], [("image", 1), ("image", 2)], [], [("image", 3)]]
    model = prune.wrap(tiny_llava_onevision(), method, keep=0.4)
    batch = build(model, prompts, [4, 12, 8, 15], seed=2)
    with torch.no_grad():
        out = model.generate(**batch, **GEN)[:, batch["input_ids"].shape[1] :]
        for row in range(len(prompts)):
            single = build(model, [prompts[row]], [[4, 12, 8, 15][row]], seed=2)
            # same images as the batch row
            if "pixel_values" in single:
                first = sum(len(p) for p in prompts[:row])
                single["pixel_values"] = batch["pixel_values"][first : first + len(prompts[row])]
            single = _same_text(batch, single, row)
            tokens = model.generate(**single, **GEN)[0, single["input_ids"].shape[1] :]
            assert tokens.tolist() == out[row].tolist()


def _same_text(batch, single, row):
    ids = batch["input_ids"][row][batch["attention_mask"][row].bool()][None]
    return {**single, "input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_cls_refused_on_siglip():
    with pytest.raises(ValueError, match="needs a \\[CLS\\] token.*hiprune"):
        prune.wrap(tiny_llava_onevision(), "cls", keep=0.3)


def test_eager_and_sdpa_agree():
    results = {}
    for attn in ("eager", "sdpa"):
        model = tiny_llava_onevision(attn_implementation=attn)
        inputs = build(model, [KINDS["image+video"]], [6])
        prune.wrap(model, "hiprune", keep=0.3)
        with torch.no_grad():
            results[attn] = (model(**inputs).logits, model.prune_state.last.keep_mask)
    assert torch.equal(results["eager"][1], results["sdpa"][1])
    torch.testing.assert_close(results["eager"][0], results["sdpa"][0], atol=1e-4, rtol=1e-4)
