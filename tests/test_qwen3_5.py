"""Qwen3.5: vision-side methods on a language model that mixes gated-DeltaNet linear attention and
full attention; in-LLM methods are refused. The oracle runs the unwrapped language model (recurrent
states and KV cache built from the reduced sequence) on the reduced embeddings and positions."""

import pytest
import torch
import transformers

import prune
from prune._tiny import tiny_qwen3_5
from tests.oracle import qwen3_full_inputs, run_reduced_mrope
from tests.test_qwen3_vl import KINDS, make_inputs, select_rows

if not hasattr(transformers, "Qwen3_5ForConditionalGeneration"):  # an older release: the family is absent
    pytest.skip("no Qwen3_5ForConditionalGeneration in this transformers", allow_module_level=True)

GEN = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False}
METHODS = ["random", "pool", "hiprune"]


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_keep_one(method):
    model = tiny_qwen3_5()
    inputs = make_inputs([KINDS["image+video"]], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, method, keep=1.0)
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", ["image", "2 images", "video", "image+video"])
def test_oracle_prefill_and_generate(method, kind):
    model = tiny_qwen3_5()
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
    embeds, positions, _, _ = qwen3_full_inputs(model, inputs)
    embeds = embeds[0]
    if method == "pool":
        for im in record.images:
            embeds[im.positions[im.kept]] = im.merged
    assert torch.equal(record.position_ids[-3:, 0], positions[:, 0, keep])
    ref_logits, ref_tokens = run_reduced_mrope(model, embeds[keep], positions[:, 0, keep], steps=6)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens


@pytest.mark.parametrize("method", ["hiprune", "random"])
def test_batch_equals_singles(method):
    prompts = [
        [("image", (1, 8, 12))],
        [("image", (1, 12, 8)), ("video", (2, 8, 8))],
        [],
        [("video", (2, 4, 8))],
        [("image", (1, 8, 8)), ("image", (1, 4, 8))],  # two images
    ]
    inputs = make_inputs(prompts, [5, 14, 9, 20, 7], seed=4)
    model = prune.wrap(tiny_qwen3_5(), method, keep=0.4)
    with torch.no_grad():
        out = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        batch_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        for row in range(len(prompts)):
            single = select_rows(prompts, inputs, [row])
            o = model.generate(**single, **GEN, return_dict_in_generate=True, output_logits=True)
            assert o.sequences[0, single["input_ids"].shape[1] :].tolist() == batch_tokens[row].tolist()
            torch.testing.assert_close(o.logits[0][0], out.logits[0][row], atol=1e-4, rtol=1e-4)


def test_eager_and_sdpa_agree():
    inputs = make_inputs([KINDS["image+video"]], [9])
    results = {}
    for attn in ("eager", "sdpa"):
        model = prune.wrap(tiny_qwen3_5(attn_implementation=attn), "hiprune", keep=0.3)
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
        results[attn] = (model.prune_state.last.keep_mask, logits, tokens)
    assert torch.equal(results["eager"][0], results["sdpa"][0])
    torch.testing.assert_close(results["eager"][1], results["sdpa"][1], atol=1e-4, rtol=1e-4)
    assert torch.equal(results["eager"][2], results["sdpa"][2])


def test_in_llm_cls_and_compact_are_refused():
    model = tiny_qwen3_5()
    for method in ("fastv", "pdrop", "transprune"):
        with pytest.raises(ValueError, match="not supported on Qwen3.5.*linear_attention"):
            prune.wrap(model, method, keep=0.6)
    with pytest.raises(ValueError, match="needs a \\[CLS\\] token.*hiprune"):
        prune.wrap(model, "cls", keep=0.3)
    with pytest.raises(ValueError, match="positions='compact' is not supported"):
        prune.wrap(model, "hiprune", keep=0.3, positions="compact")
    assert not hasattr(model, "prune_state")


def test_unwrap_restores():
    model = tiny_qwen3_5()
    inputs = make_inputs([KINDS["image+video"]], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, "hiprune", keep=0.3)
        model.generate(**inputs, **GEN)
        prune.unwrap(model)
        out = model(**inputs).logits
    assert not any(k in model.model.__dict__ for k in ("get_image_features", "get_video_features"))
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
