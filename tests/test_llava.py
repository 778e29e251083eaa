"""Contracts on LLaVA-1.5 (CLIP, and DINOv2 as in the proxy VLM) and LLaVA-NeXT: identity, oracle
equivalence, batch, backends."""

import pytest
import torch

import prune
from tests.oracle import full_inputs_embeds, reduced_positions, run_reduced

METHODS = ["random", "pool", "cls", "hiprune"]
FAMILIES = ["llava", "llava_next", "llava_dinov2"]
GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_identity_at_keep_one(make_case, family, method):
    case = make_case(family, prompts=((0, 1),) if family == "llava_next" else ((0,),))
    inputs = case.inputs()
    with torch.no_grad():
        ref = case.model(**inputs).logits
        prune.wrap(case.model, method, keep=1.0)
        out = case.model(**inputs).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert bool(case.model.prune_state.last.keep_mask.all())


def _pooled_embeds(embeds, record, grid=8):
    """Independent 2x2 average pooling of one LLaVA-1.5 image's rows (keep=0.25 on an 8x8 grid)."""
    pos = record.positions
    feats = embeds[pos].view(grid, grid, -1).permute(2, 0, 1)
    pooled = torch.nn.functional.avg_pool2d(feats[None], 2)[0].permute(1, 2, 0).reshape(-1, feats.shape[0])
    out = embeds.clone()
    cells = [r * grid + c for r in range(0, grid, 2) for c in range(0, grid, 2)]
    out[pos[cells]] = pooled
    return out


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_oracle_prefill_and_generate(make_case, family, method, positions):
    prompts = ((1, 3),) if family == "llava_next" else ((0, 1),)  # two images in one prompt
    case = make_case(family, prompts=prompts, text_lens=(12,))
    inputs = case.inputs()
    model = prune.wrap(case.model, method, keep=0.25, positions=positions)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    keep = record.keep_mask[0]
    assert record.vision_tokens_after < record.vision_tokens_before
    prune.unwrap(model)
    embeds = full_inputs_embeds(model, inputs)[0]
    if method == "pool" and family != "llava_next":  # independent 2x2 pooling
        for im in record.images:
            embeds = _pooled_embeds(embeds, im)
    elif method == "pool":  # anyres crops: "the rows the method produced"
        for im in record.images:
            embeds[im.positions[im.kept]] = im.merged
    ref_logits, ref_tokens = run_reduced(model, embeds[keep], reduced_positions(keep, positions))
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["random", "pool", "hiprune", "cls"])
def test_batch_equals_singles(make_case, family, method):
    # 3 prompts: different images, image counts and prompt lengths (left padding), one without images.
    prompts = ((0,), (1, 2), (), (3,)) if family == "llava_next" else ((0,), (1, 2), (), (3,))
    case = make_case(family, prompts=prompts, text_lens=(5, 14, 9, 20), seed=3)
    model = prune.wrap(case.model, method, keep=0.3)
    with torch.no_grad():
        batch_inputs = case.inputs()
        out = model.generate(**batch_inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        batch_tokens = out.sequences[:, batch_inputs["input_ids"].shape[1] :]
        batch_first_logits = out.logits[0]
        batch_kept = model.prune_state.last.keep_mask
        for row in range(len(prompts)):
            single = case.inputs([row])
            o = model.generate(**single, **GEN, return_dict_in_generate=True, output_logits=True)
            assert o.sequences[0, single["input_ids"].shape[1] :].tolist() == batch_tokens[row].tolist()
            torch.testing.assert_close(o.logits[0][0], batch_first_logits[row], atol=1e-4, rtol=1e-4)
            single_kept = model.prune_state.last.keep_mask[0]
            assert batch_kept[row, -single_kept.numel() :].tolist() == single_kept.tolist()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["cls", "hiprune", "pool"])
def test_eager_and_sdpa_agree(make_case, family, method):
    results = {}
    for attn in ("eager", "sdpa"):
        case = make_case(family, attn=attn, prompts=((0, 2),), text_lens=(8,))
        model = prune.wrap(case.model, method, keep=0.4)
        with torch.no_grad():
            logits = model(**case.inputs()).logits
            tokens = model.generate(**case.inputs(), **GEN)
        results[attn] = (model.prune_state.last.keep_mask, logits, tokens)
    assert torch.equal(results["eager"][0], results["sdpa"][0])
    torch.testing.assert_close(results["eager"][1], results["sdpa"][1], atol=1e-4, rtol=1e-4)
    assert torch.equal(results["eager"][2], results["sdpa"][2])


def test_llava_next_keeps_newlines_and_splits_budget(make_case):
    case = make_case("llava_next", prompts=((3,),))
    model = prune.wrap(case.model, "hiprune", keep=0.2)
    ids = case.inputs()["input_ids"]
    with torch.no_grad():
        model(**case.inputs())
    record = model.prune_state.last.images[0]
    layout = model.prune_state  # noqa: F841
    newline = record.scores["score"].isnan()  # newline tokens are never candidates
    assert newline.sum() > 0 and bool(record.kept[newline].all())
    prunable = int((~newline).sum())
    assert record.budget == round(0.2 * prunable)
    assert int(record.kept[~newline].sum()) == record.budget
    assert ids.shape[1] - model.prune_state.last.keep_mask.sum() == prunable - record.budget


def test_generate_without_kv_cache_prunes_every_step(make_case):
    # use_cache=False re-runs the prefill at every step (with the same encoder outputs in new
    # transformers): each step must prune the same way, so the tokens equal the cached run's.
    case = make_case("llava", prompts=((0, 1),), text_lens=(10,))
    model = prune.wrap(case.model, "hiprune", keep=0.25)
    with torch.no_grad():
        cached = model.generate(**case.inputs(), **GEN)
        uncached = model.generate(**case.inputs(), **GEN, use_cache=False)
    assert torch.equal(cached, uncached)
    assert model.prune_state.last.vision_tokens_after == 32
