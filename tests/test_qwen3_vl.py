"""Qwen3-VL (dense and MoE): DeepStack features follow the kept rows; interleaved M-RoPE; video with
timestamp text between temporal slices. The oracle runs the unwrapped language model on the reduced
embeddings, positions, DeepStack mask and DeepStack features."""

import pytest
import torch
import transformers

import prune
from prune._tiny import qwen3_prompts, qwen_media, tiny_qwen3_vl
from tests.oracle import qwen3_full_inputs, reduce_deepstack, run_reduced_mrope
from tests.test_llm_methods import layer_loop

if not hasattr(transformers, "Qwen3VLForConditionalGeneration"):  # an older release: the family is absent
    pytest.skip("no Qwen3VLForConditionalGeneration in this transformers", allow_module_level=True)

GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
METHODS = ["random", "pool", "hiprune"]
LLM_METHODS = ["fastv", "pdrop", "transprune"]
KINDS = {
    "image": [("image", (1, 8, 12))],
    "2 images": [("image", (1, 8, 8)), ("image", (1, 12, 8))],
    "video": [("video", (2, 8, 8))],
    "image+video": [("image", (1, 8, 12)), ("video", (2, 8, 8))],
}


def make_inputs(prompts, text_lens, seed=0):
    inputs = qwen3_prompts(prompts, text_lens, seed=seed)
    for kind, pv_key, grid_key in (
        ("image", "pixel_values", "image_grid_thw"),
        ("video", "pixel_values_videos", "video_grid_thw"),
    ):
        grids = [g for items in prompts for k, g in items if k == kind]
        if grids:
            inputs[pv_key], inputs[grid_key] = qwen_media(grids, seed=seed + len(kind))
    return inputs


def select_rows(prompts, inputs, rows):
    from tests.test_qwen import select_rows as qwen_select

    return qwen_select(prompts, inputs, rows)


@pytest.mark.parametrize("moe", [False, True])
@pytest.mark.parametrize("method", METHODS + LLM_METHODS)
def test_identity_at_keep_one(method, moe):
    model = tiny_qwen3_vl(moe=moe, text_layers=4)
    inputs = make_inputs([KINDS["image+video"]], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, method, keep=1.0)
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", list(KINDS))
def test_oracle_prefill_and_generate(method, kind):
    check_oracle(method, kind, moe=False)


@pytest.mark.parametrize("method", ["hiprune", "random"])
def test_moe_oracle_prefill_and_generate(method):
    check_oracle(method, "image+video", moe=True)


def check_oracle(method, kind, moe):
    model = tiny_qwen3_vl(moe=moe)
    inputs = make_inputs([KINDS[kind]], [11])
    prune.wrap(model, method, keep=0.3)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    assert {im.modality for im in record.images} == {k for k, _ in KINDS[kind]}
    for im in record.images:
        assert im.tokens_after == round(0.3 * im.tokens_before) or method == "pool"
    keep = record.keep_mask[0]
    prune.unwrap(model)
    embeds, positions, visual, deepstack = qwen3_full_inputs(model, inputs)
    embeds = embeds[0]
    if method == "pool":
        for im in record.images:
            embeds[im.positions[im.kept]] = im.merged
    assert torch.equal(record.position_ids[-3:, 0], positions[:, 0, keep])  # original (t, h, w) ids
    assert len(deepstack) == 2 and visual.sum() == deepstack[0].shape[0]
    ref_logits, ref_tokens = run_reduced_mrope(
        model, embeds[keep], positions[:, 0, keep], prefill_kwargs=reduce_deepstack(visual, deepstack, keep)
    )
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens
    # the oracle is sensitive to DeepStack: features on shifted rows give other logits
    shifted = reduce_deepstack(visual, deepstack, keep)
    shifted["deepstack_visual_embeds"] = [d.roll(1, 0) for d in shifted["deepstack_visual_embeds"]]
    wrong, _ = run_reduced_mrope(model, embeds[keep], positions[:, 0, keep], steps=0, prefill_kwargs=shifted)
    assert not torch.allclose(wrong, logits, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_singles(method):
    prompts = [
        [("image", (1, 8, 12))],
        [("image", (1, 12, 8)), ("video", (2, 8, 8))],
        [],
        [("video", (2, 4, 8))],
        [("image", (1, 8, 8)), ("image", (1, 4, 8))],  # two images
    ]
    inputs = make_inputs(prompts, [5, 14, 9, 20, 7], seed=4)
    model = prune.wrap(tiny_qwen3_vl(), method, keep=0.4)
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


@pytest.mark.parametrize("moe", [False, True])
def test_eager_and_sdpa_agree(moe):
    inputs = make_inputs([KINDS["image+video"]], [9])
    results = {}
    for attn in ("eager", "sdpa"):
        model = prune.wrap(tiny_qwen3_vl(moe=moe, attn_implementation=attn), "hiprune", keep=0.3)
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
        results[attn] = (model.prune_state.last.keep_mask, logits, tokens)
    assert torch.equal(results["eager"][0], results["sdpa"][0])
    torch.testing.assert_close(results["eager"][1], results["sdpa"][1], atol=1e-4, rtol=1e-4)
    assert torch.equal(results["eager"][2], results["sdpa"][2])


@pytest.mark.parametrize("method", LLM_METHODS)
def test_llm_methods_oracle_and_batch(method):
    """In-LLM cuts at layers 2.. of 8: DeepStack adds after layers 0 and 1, and (fastv, K=2 when
    scheduled early) must follow the cut. The layer loop runs the unwrapped layers by hand on what
    each layer saw, adding the DeepStack features to the rows that are still there."""
    prompts = [[("image", (1, 8, 12))], [("image", (1, 12, 8)), ("video", (2, 8, 8))], []]
    inputs = make_inputs(prompts, [5, 14, 9], seed=4)
    model = prune.wrap(tiny_qwen3_vl(text_layers=8), method, keep=0.45)
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
    embeds, positions, visual, deepstack = qwen3_full_inputs(model, single)
    ref_logits, ref_tokens = layer_loop_deepstack(model, embeds, positions[:, 0], record, visual, deepstack)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens


@pytest.mark.parametrize("moe", [False, True])
def test_fastv_cut_before_deepstack_ends(moe):
    """A cut at layer 1 (DeepStack still adds after layer 1) on a batch with padding: the features
    must land on the kept visual rows (oracle: the layer loop)."""
    prompts = [[("image", (1, 8, 12))], [("image", (1, 12, 8)), ("video", (2, 8, 8))]]
    inputs = make_inputs(prompts, [5, 14], seed=1)
    model = prune.wrap(tiny_qwen3_vl(moe=moe, text_layers=4), "fastv", schedule=[(1, 0.3)])
    singles = [select_rows(prompts, inputs, [row]) for row in range(2)]
    with torch.no_grad():
        batch = model(**inputs).logits[:, -1]
        runs = []
        for single in singles:
            runs.append((model(**single).logits[0], model.prune_state.last))
    prune.unwrap(model)
    for row, (single, (logits, record)) in enumerate(zip(singles, runs)):
        torch.testing.assert_close(logits[-1], batch[row], atol=1e-4, rtol=1e-4)
        embeds, positions, visual, deepstack = qwen3_full_inputs(model, single)
        ref, _ = layer_loop_deepstack(model, embeds, positions[:, 0], record, visual, deepstack, steps=0)
        torch.testing.assert_close(logits, ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def layer_loop_deepstack(model, embeds, positions, record, visual, deepstack, steps=8):
    """tests.test_llm_methods.layer_loop, plus DeepStack: after decoder layer i < len(deepstack), the
    i-th features of the visual rows that layer saw are added to them."""
    lm = model.model.language_model
    cols_of = {}

    def after_layer(i):
        def hook(module, args, output):
            if i >= len(deepstack) or i not in cols_of:
                return None
            cols = cols_of.pop(i)
            vis = visual[0, cols]
            index = visual[0].long().cumsum(0) - 1
            out = output.clone()
            out[0, vis] = out[0, vis] + deepstack[i][index[cols[vis]]]
            return out

        return hook

    def before_layer(i):
        def hook(module, args, kwargs):
            if args[0].shape[1] > 1:  # prefill
                cols_of[i] = torch.nonzero(record.seen_by(i)[0], as_tuple=True)[0]

        return hook

    handles = []
    for i, layer in enumerate(lm.layers):
        handles += [
            layer.register_forward_pre_hook(before_layer(i), with_kwargs=True),
            layer.register_forward_hook(after_layer(i)),
        ]
    try:
        return layer_loop(model, embeds, positions, record, "original", steps=steps)
    finally:
        for h in handles:
            h.remove()


def test_cls_and_compact_are_refused():
    model = tiny_qwen3_vl()
    with pytest.raises(ValueError, match="needs a \\[CLS\\] token.*hiprune"):
        prune.wrap(model, "cls", keep=0.3)
    with pytest.raises(ValueError, match="positions='compact' is not supported"):
        prune.wrap(model, "hiprune", keep=0.3, positions="compact")
    assert not hasattr(model, "prune_state")


def test_unrecognised_deepstack_structure_is_refused():
    model = tiny_qwen3_vl()
    lm = model.model.language_model
    lm._deepstack_process = None  # a release without the seam
    with pytest.raises(TypeError, match="DeepStack"):
        prune.wrap(model, "fastv", keep=0.5)
    del lm._deepstack_process
    inputs = make_inputs([KINDS["image"]], [9])
    prune.wrap(model, "random", keep=0.3)

    def drop_deepstack(module, args, kwargs):
        return args, {
            k: v for k, v in kwargs.items() if k not in ("visual_pos_masks", "deepstack_visual_embeds")
        }

    handle = lm.register_forward_pre_hook(drop_deepstack, with_kwargs=True, prepend=True)
    with pytest.raises(RuntimeError, match="no DeepStack arguments"), torch.no_grad():
        model(**inputs)
    handle.remove()


def test_unwrap_restores():
    model = tiny_qwen3_vl(text_layers=4)
    inputs = make_inputs([KINDS["image+video"]], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        for method in ("hiprune", "fastv"):
            prune.wrap(model, method, keep=0.3 if method == "hiprune" else 0.6)
            model(**inputs)
            prune.unwrap(model)
        out = model(**inputs).logits
    assert not any(k in model.model.__dict__ for k in ("get_image_features", "get_video_features"))
    assert "_deepstack_process" not in model.model.language_model.__dict__
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_hiprune_layers_for_the_encoder():
    from prune.hooks import adapter_for
    from prune.methods import get_method

    _, options = prune.PruneConfig(method="hiprune").resolved("qwen3_vl")
    method = get_method("hiprune")(**options)
    info = adapter_for(tiny_qwen3_vl(depth=27)).encoder_info()
    assert method.layers(info) == (13, 26)  # Qwen3-VL-8B: block 13 of 27, deep = last block
