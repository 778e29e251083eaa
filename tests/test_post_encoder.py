"""Between the vision encoder and the language model, a wrapped model's prefill reads nothing back
from the device, the model's own code included: transformers' placeholder check runs on prune's host
copy of the prompt (``Adapter._host_call``), and a cut whose rows are all as long as the
longest hands the language model no mask (``cutter.cut_prefill``), so its all-ones check does not run.
Checked on the CPU with the detector of ``tests/host_reads.py``; on a GPU both were synchronisations
that made the host wait for the encoder to finish before it queued the rest of the prefill."""

import pytest
import torch

import prune
from prune._tiny import build_prompts, image_token_counts, internvl_inputs, tiny_internvl, tiny_llava
from prune.hooks import base
from tests.host_reads import watch_forward


def _llava(batch=3, seed=0, text_layers=2, text_lens=None, pad_left=True):
    """Prompts of one image each and equal text (``text_lens``: else): every row keeps the same count
    (a uniform cut). SDPA: its mask builder is the one that checks a mask for all ones."""
    model = tiny_llava(attn_implementation="sdpa", text_layers=text_layers)
    pv = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    counts = image_token_counts(model, pv, None)
    ids, mask = build_prompts([[c] for c in counts], text_lens or [7] * batch, seed=seed, pad_left=pad_left)
    return model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}


def _deep_llava(**kwargs):
    return _llava(text_layers=8, **kwargs)  # room for the in-LLM methods' cut layers


def _internvl():
    return tiny_internvl(attn_implementation="sdpa"), internvl_inputs([[1], [1]], [6, 6], seed=2)


CASES = [(_llava, "random"), (_llava, "hiprune"), (_llava, "cls"), (_internvl, "hiprune")]
CASES += [(_deep_llava, m) for m in ("fastv", "pdrop", "transprune")]  # in-LLM: the cut inside the decoder


@pytest.mark.parametrize("build,method", CASES, ids=[f"{b.__name__[1:]}-{m}" for b, m in CASES])
def test_whole_prefill_reads_nothing_after_the_prompt(monkeypatch, build, method):
    model, inputs = build()
    with watch_forward(monkeypatch, inputs) as mode:
        prune.wrap(model, method, keep=0.5 if build is _deep_llava else 0.3)
        with torch.no_grad(), mode.window():
            model(**inputs, use_cache=True)
    last = model.prune_state.last
    if build is _deep_llava:
        assert int(last.layer_masks[-1][1].sum()) < last.layer_masks[-1][1].numel()
    else:
        assert last.vision_tokens_after < last.vision_tokens_before
    assert mode.reads == [], "\n".join(mode.reads[:3])


def test_the_whole_forward_window_sees_the_models_own_check(monkeypatch):
    """Without prune's host version, transformers' placeholder check is a read: the test above can fail."""
    monkeypatch.setattr(base.Adapter, "_host_call",
                        lambda self, original, args, kwargs, shape_only: original(*args, **kwargs))
    model, inputs = _llava()
    with watch_forward(monkeypatch, inputs) as mode:
        prune.wrap(model, "random", keep=0.3)
        with torch.no_grad(), mode.window():
            model(**inputs, use_cache=True)
    assert any("torch_compilable_check" in read for read in mode.reads)


def test_placeholder_masks_are_the_models_own_computed_on_the_host(monkeypatch):
    """The model's ``get_placeholder_mask`` is called with the host copy of the ids (not the device
    ones), and returns what it returns on the device ids; logits equal those of the model's own path."""
    model, inputs = _llava()
    cls = type(model.model)
    seen = []
    own = cls.get_placeholder_mask

    def spy(self, input_ids, inputs_embeds, *args, **kwargs):  # the parameters read by position
        seen.append(input_ids)
        return own(self, input_ids, inputs_embeds, *args, **kwargs)

    monkeypatch.setattr(cls, "get_placeholder_mask", spy)
    prune.wrap(model, "random", keep=0.3, seed=0)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert len(seen) == 1 and seen[0] is not inputs["input_ids"] and torch.equal(seen[0], inputs["input_ids"])
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    features = torch.zeros(int((inputs["input_ids"] == model.config.image_token_id).sum()), embeds.shape[-1])
    theirs = own(model.model, inputs["input_ids"], embeds, features)
    model.prune_state._call = {"input_ids": inputs["input_ids"], "host:ids": inputs["input_ids"].clone()}
    ours = model.model.get_placeholder_mask(inputs["input_ids"], inputs_embeds=embeds, image_features=features)
    model.prune_state._call = {}
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    monkeypatch.setattr(base.Adapter, "_host_call",
                        lambda self, original, args, kwargs, shape_only: original(*args, **kwargs))
    prune.unwrap(model)
    prune.wrap(model, "random", keep=0.3, seed=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=0, atol=0)


def test_placeholder_check_on_the_host_still_refuses_features_that_do_not_fit():
    model, inputs = _llava()
    prune.wrap(model, "random", keep=0.3)
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    too_few = torch.zeros(int((ids == model.config.image_token_id).sum()) - 1, embeds.shape[-1])
    model.prune_state._call = {"input_ids": ids, "host:ids": ids.clone()}
    with pytest.raises(ValueError, match="do not match"):
        model.model.get_placeholder_mask(ids, inputs_embeds=embeds, image_features=too_few)


def test_other_calls_run_the_models_own_placeholder_mask(monkeypatch):
    """Ids that are not this call's prompt (a direct call, no host copy) take the model's own path."""
    model, inputs = _llava()
    cls = type(model.model)
    seen = []
    own = cls.get_placeholder_mask
    monkeypatch.setattr(cls, "get_placeholder_mask",
                        lambda self, input_ids, *a, **k: seen.append(input_ids) or own(self, input_ids, *a, **k))
    prune.wrap(model, "random", keep=0.3)
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    features = torch.zeros(int((ids == model.config.image_token_id).sum()), embeds.shape[-1])
    model.model.get_placeholder_mask(ids, embeds, features)  # no call record
    model.prune_state._call = {"input_ids": ids.clone(), "host:ids": ids.clone()}  # another prompt's
    model.model.get_placeholder_mask(ids, embeds, features)
    assert len(seen) == 2 and all(s is ids for s in seen)


def _language_model_kwargs(model, inputs, **call):
    captured = {}

    def grab(module, args, kwargs):
        captured.update(kwargs)

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)  # after prune's
    try:
        with torch.no_grad():
            out = model(**inputs, **call)
    finally:
        handle.remove()
    return captured, out


def test_a_uniform_cut_beside_a_cache_passes_no_mask_and_changes_nothing():
    model, inputs = _llava()
    prune.wrap(model, "hiprune", keep=0.3)
    kwargs, out = _language_model_kwargs(model, inputs, use_cache=True)
    assert kwargs["attention_mask"] is None
    embeds = kwargs["inputs_embeds"]
    ones = torch.ones(embeds.shape[:2], dtype=torch.long)
    prune.unwrap(model)
    with torch.no_grad():
        ref = model.model.language_model(inputs_embeds=embeds, attention_mask=ones,
                                         position_ids=kwargs["position_ids"])
    torch.testing.assert_close(model.lm_head(ref.last_hidden_state), out.logits, rtol=1e-5, atol=1e-5)


def test_without_a_cache_or_with_ragged_rows_the_cut_keeps_its_mask():
    """No cache: transformers reads skipping positions without a mask as packed sequences; ragged
    rows: the mask holds the padding."""
    model, inputs = _llava()
    prune.wrap(model, "hiprune", keep=0.3)
    kwargs, no_cache = _language_model_kwargs(model, inputs, use_cache=False)
    assert isinstance(kwargs["attention_mask"], torch.Tensor)
    _, cached = _language_model_kwargs(model, inputs, use_cache=True)
    torch.testing.assert_close(no_cache.logits, cached.logits, rtol=1e-5, atol=1e-5)
    ids, mask = build_prompts([[c] for c in image_token_counts(model, inputs["pixel_values"][:2], None)], [5, 9])
    ragged = {"input_ids": ids, "attention_mask": mask, "pixel_values": inputs["pixel_values"][:2]}
    kwargs, _ = _language_model_kwargs(model, ragged, use_cache=True)
    assert isinstance(kwargs["attention_mask"], torch.Tensor) and not bool(kwargs["attention_mask"].all())


@pytest.mark.parametrize("method", ["fastv", "pdrop", "transprune"])
@pytest.mark.parametrize("text_lens,pad_left", [(None, True), ([4, 12, 7], True), ([4, 12, 7], False)],
                         ids=["equal", "left-padded", "right-padded"])
def test_in_llm_sizes_counted_on_the_host_equal_the_device_read(monkeypatch, method, text_lens, pad_left):
    """An in-LLM method's prompt sizes (vision counts, instruction rows, right alignment) counted on
    the host copy of the prompt give the cut, the kept layers and the logits of the device read."""
    model, inputs = _deep_llava(text_lens=text_lens, pad_left=pad_left)
    prune.wrap(model, method, keep=0.5)
    with torch.no_grad():
        logits = model(**inputs, use_cache=True).logits
        layers = model.prune_state.last.layer_masks
        tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    monkeypatch.setattr(base.Adapter, "_host_mask_values", staticmethod(lambda *args: None))  # the device read
    with torch.no_grad():
        ref_logits = model(**inputs, use_cache=True).logits
        ref_layers = model.prune_state.last.layer_masks
        ref_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert [li for li, _ in layers] == [li for li, _ in ref_layers]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(layers, ref_layers))
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, ref_tokens)


@pytest.mark.parametrize("method", ["hiprune", "fastv"])
def test_generate_takes_the_host_placeholder_check(monkeypatch, method):
    """In ``generate`` (which encodes the media before its prefill forward) the check runs on the
    host copy too: the model's ``get_placeholder_mask`` gets the stand-in of the embeddings (no data,
    stride 0), and the tokens equal those of the model's own check."""
    model, inputs = _deep_llava()
    cls = type(model.model)
    own, stand_ins = cls.get_placeholder_mask, []

    def spy(self, input_ids, inputs_embeds, *args, **kwargs):
        stand_ins.append(all(st == 0 for st in inputs_embeds.stride()))
        return own(self, input_ids, inputs_embeds, *args, **kwargs)

    monkeypatch.setattr(cls, "get_placeholder_mask", spy)
    prune.wrap(model, method, keep=0.5)
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert stand_ins == [True]
    monkeypatch.setattr(base.Adapter, "_host_call",
                        lambda self, original, args, kwargs, shape_only: original(*args, **kwargs))
    with torch.no_grad():
        assert torch.equal(model.generate(**inputs, max_new_tokens=4, do_sample=False), tokens)
    assert stand_ins == [True, False]



QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2_5_vl+seconds"]


def _qwen(family):
    """Three prompts, images and a video, left padding; "+seconds": with the video's seconds per
    temporal grid (a float tensor the index reads)."""
    from tests.test_select_batch import _family_cases

    model, inputs = _family_cases()[family.split("+")[0]][0]()
    if family.endswith("+seconds"):
        inputs["second_per_grid_ts"] = torch.tensor([0.7])
    return model, inputs


@pytest.mark.parametrize("family", QWEN)
def test_qwen_rotary_index_and_placeholder_check_read_nothing(monkeypatch, family):
    """Qwen's M-RoPE index (``get_rope_index``: a loop over the prompts that reads ids, token types,
    grids and mask) and the placeholder check run on host copies: no read inside either. (The model's
    other reads, of the grids inside its encoder and of the split sizes after it, are its own.)"""
    model, inputs = _qwen(family)
    with watch_forward(monkeypatch, inputs) as mode:
        prune.wrap(model, "hiprune", keep=0.3)
        with torch.no_grad(), mode.window():
            model(**inputs, use_cache=True)
    assert model.prune_state.last.vision_tokens_after < model.prune_state.last.vision_tokens_before
    helpers = ("in get_rope_index", "in compute_3d_position_ids", "in get_placeholder_mask", "torch_compilable_check")
    inside = [r for r in mode.reads if any(h in r for h in helpers)]
    assert mode.reads and inside == [], "\n".join(inside[:3])


@pytest.mark.parametrize("family", QWEN)
def test_qwen_rotary_index_on_the_host_equals_the_models_own(monkeypatch, family):
    """The host copies give the model's own positions: the prefill's logits, the positions the
    language model got and the generated tokens (decoding continues from the model's rope deltas)
    equal those of the model's own device path; the index ran on the host copy of the ids."""
    model, inputs = _qwen(family)
    cls = type(model.model)
    own, seen = cls.get_rope_index, []

    def spy(self, input_ids, *args, **kwargs):
        seen.append(input_ids)
        return own(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(cls, "get_rope_index", spy)
    prune.wrap(model, "hiprune", keep=0.3)
    with torch.no_grad():
        logits = model(**inputs, use_cache=True).logits
        positions = model.prune_state.last.position_ids
        tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert seen and all(ids is not inputs["input_ids"] for ids in seen[:1])
    monkeypatch.setattr(base.Adapter, "_host_call",
                        lambda self, original, args, kwargs, shape_only: original(*args, **kwargs))
    with torch.no_grad():
        ref_logits = model(**inputs, use_cache=True).logits
        ref_positions = model.prune_state.last.position_ids
        ref_tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert seen[-1] is not None and torch.equal(positions, ref_positions)
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=0)
    assert torch.equal(tokens, ref_tokens)
