"""Gemma 3: SigLIP without [CLS], 4x4-pooled tokens, bidirectional image blocks from token_type_ids
and sliding-window layers. The oracle runs the unwrapped Gemma3Model (which builds its own masks)
on the reduced embeddings, positions and token_type_ids."""

import pytest
import torch
import transformers
from transformers import DynamicCache

import prune
from prune._compat import with_cache
from prune._tiny import GEMMA_TOKENS, gemma3_inputs, tiny_gemma3

if not hasattr(transformers, "Gemma3ForConditionalGeneration"):  # an older release: the family is absent
    pytest.skip("no Gemma3ForConditionalGeneration in this transformers", allow_module_level=True)


GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
METHODS = ["random", "pool", "hiprune"]


@torch.no_grad()
def full_embeds(model, inputs):
    """inputs_embeds the unwrapped model hands its language model (images scattered in)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"].clone())

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"]


@torch.no_grad()
def run_reduced(model, embeds, positions, token_type_ids, steps=8):
    """Prefill logits and greedy tokens of one unpadded prompt through the unwrapped Gemma3Model:
    embeds (L', D), positions (L',), token_type_ids (L',) (None: no bidirectional image blocks)."""
    inner = model.model
    cache = DynamicCache(config=model.config.get_text_config())
    mask = torch.ones(1, embeds.shape[0], dtype=torch.long)
    tt = None if token_type_ids is None else token_type_ids[None]
    out = inner(
        **with_cache(
            inner.forward,
            cache,
            inputs_embeds=embeds[None],
            position_ids=positions[None],
            attention_mask=mask,
            token_type_ids=tt,
            use_cache=True,
        )
    )
    logits = model.lm_head(out.last_hidden_state)[0]
    tokens, nxt, pos = [], logits[-1].argmax(), int(positions[-1])
    for _ in range(steps):
        tokens.append(int(nxt))
        pos += 1
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], 1)
        e = model.get_input_embeddings()(nxt.view(1, 1))
        out = inner(
            **with_cache(
                inner.forward,
                cache,
                inputs_embeds=e,
                position_ids=torch.tensor([[pos]]),
                attention_mask=mask,
                use_cache=True,
            )
        )
        nxt = model.lm_head(out.last_hidden_state)[0, -1].argmax()
    return logits, tokens


def select_rows(inputs, images_per_prompt, rows):
    out = {k: inputs[k][rows] for k in ("input_ids", "attention_mask", "token_type_ids")}
    first = int(out["attention_mask"].argmax(1).min())
    out = {k: v[:, first:] for k, v in out.items()}
    starts = [sum(images_per_prompt[:r]) for r in range(len(images_per_prompt) + 1)]
    img = [i for r in rows for i in range(starts[r], starts[r + 1])]
    if img:
        out["pixel_values"] = inputs["pixel_values"][img]
    return out


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_keep_one(method):
    model = tiny_gemma3()
    inputs = gemma3_inputs([2], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, method, keep=1.0)
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", METHODS)
def test_oracle_prefill_and_generate(method, positions):
    model = tiny_gemma3()
    inputs = gemma3_inputs([2], [12])  # 49 tokens: longer than the sliding window (8)
    prune.wrap(model, method, keep=0.4, positions=positions)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(record.images) == 2 and record.positions == positions
    for im in record.images:
        assert im.tokens_before == GEMMA_TOKENS
        assert im.tokens_after == round(0.4 * GEMMA_TOKENS) or method == "pool"
    keep = record.keep_mask[0]
    prune.unwrap(model)
    embeds = full_embeds(model, inputs)[0]
    if method == "pool":
        for im in record.images:
            embeds[im.positions[im.kept]] = im.merged
    length = keep.numel()
    pos = torch.arange(length)[keep] if positions == "original" else torch.arange(int(keep.sum()))
    tt = inputs["token_type_ids"][0][keep]
    ref_logits, ref_tokens = run_reduced(model, embeds[keep], pos, tt)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens
    # the bidirectional image blocks matter: without the gathered token_type_ids the logits differ
    causal_only, _ = run_reduced(model, embeds[keep], pos, None, steps=0)
    assert not torch.allclose(causal_only, logits, atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_singles(method):
    images = [1, 2, 0, 1]
    inputs = gemma3_inputs(images, [5, 14, 9, 20], seed=4)
    model = prune.wrap(tiny_gemma3(), method, keep=0.4)
    with torch.no_grad():
        out = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        batch_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        batch_kept = model.prune_state.last.keep_mask
        for row in range(len(images)):
            single = select_rows(inputs, images, [row])
            o = model.generate(**single, **GEN, return_dict_in_generate=True, output_logits=True)
            assert o.sequences[0, single["input_ids"].shape[1] :].tolist() == batch_tokens[row].tolist()
            torch.testing.assert_close(o.logits[0][0], out.logits[0][row], atol=1e-4, rtol=1e-4)
            kept = model.prune_state.last.keep_mask[0]
            assert batch_kept[row, -kept.numel() :].tolist() == kept.tolist()


def test_eager_and_sdpa_agree():
    inputs = gemma3_inputs([1, 2], [4, 10])
    results = {}
    for attn in ("eager", "sdpa"):
        model = prune.wrap(tiny_gemma3(attn_implementation=attn), "hiprune", keep=0.3)
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
        results[attn] = (model.prune_state.last.keep_mask, logits, tokens)
    assert torch.equal(results["eager"][0], results["sdpa"][0])
    torch.testing.assert_close(results["eager"][1][:, -1], results["sdpa"][1][:, -1], atol=1e-4, rtol=1e-4)
    assert torch.equal(results["eager"][2], results["sdpa"][2])


def test_scores_are_pooled_like_the_features():
    model = prune.wrap(tiny_gemma3(), "hiprune", keep=0.25)
    inputs = gemma3_inputs([1], [6])
    with torch.no_grad():
        model(**inputs)
    record = model.prune_state.last
    assert record.images[0].grids == [(4, 4)]
    assert int(record.images[0].kept.sum()) == 4


def test_cls_and_in_llm_methods_are_refused():
    model = tiny_gemma3()
    with pytest.raises(ValueError, match="needs a \\[CLS\\] token.*hiprune"):
        prune.wrap(model, "cls", keep=0.3)
    for method in ("fastv", "pdrop", "transprune"):
        with pytest.raises(ValueError, match="not supported on Gemma 3"):
            prune.wrap(model, method, keep=0.5)
    assert not hasattr(model, "prune_state")


def test_unwrap_restores():
    model = tiny_gemma3()
    inputs = gemma3_inputs([2], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, "hiprune", keep=0.3)
        model.generate(**inputs, **GEN)
        prune.unwrap(model)
        out = model(**inputs).logits
    assert "get_image_features" not in model.model.__dict__
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
