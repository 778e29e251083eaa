"""The selection runs as soon as a prefill's prompt and media are known (``Adapter._select_early``):
the end of the feature function in a forward, the multimodal pre-hook when ``generate`` encoded the
media first. Its answer must be exactly the one the language-model hook computes (the reference: the
same code path with ``early_selection`` off), and the language-model hook must then select nothing."""

import pytest
import torch

import prune
from prune.hooks import base
from tests.test_select_batch import _family_cases

CASES = [
    ("llava", "random"), ("llava", "cls"), ("llava", "hiprune"), ("llava_next", "hiprune"),
    ("qwen2_5_vl", "hiprune"), ("qwen2_vl", "random"), ("llava_onevision", "hiprune"), ("internvl", "cls"),
    ("gemma3", "hiprune"), ("qwen3_vl", "hiprune"),
]


class _SelectsAtTheLanguageModel:
    """Counts the selections made inside the language-model hook (the late path)."""

    def __init__(self, monkeypatch):
        self.late = self.total = 0
        self.inside = False
        original_call, original_select = base.Adapter._language_model_call, base.Adapter._select
        watcher = self

        def call(adapter, *args, **kwargs):
            watcher.inside = True
            try:
                return original_call(adapter, *args, **kwargs)
            finally:
                watcher.inside = False

        def select(adapter, *args, **kwargs):
            watcher.late += watcher.inside
            watcher.total += 1
            return original_select(adapter, *args, **kwargs)

        monkeypatch.setattr(base.Adapter, "_language_model_call", call)
        monkeypatch.setattr(base.Adapter, "_select", select)


def _run(family, method, early: bool, monkeypatch, generate: bool = False, **options):
    build, _ = _family_cases()[family]
    model, inputs = build()
    with monkeypatch.context() as patch:
        patch.setattr(base.Adapter, "early_selection", early)
        prune.wrap(model, method, keep=0.3, **options)
        with torch.no_grad():
            if generate:
                out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
            else:
                out = model(**inputs).logits
        last = model.prune_state.last
        return out, last


@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_early_selection_equals_the_language_model_hooks_selection(monkeypatch, family, method):
    reference, ref_last = _run(family, method, False, monkeypatch)
    watcher = _SelectsAtTheLanguageModel(monkeypatch)
    out, last = _run(family, method, True, monkeypatch)
    assert watcher.late == 0, "the language-model hook selected again"
    assert last.vision_tokens_after < last.vision_tokens_before
    assert torch.equal(last.keep_mask, ref_last.keep_mask)
    assert [(r.sample, r.positions.tolist(), r.kept.tolist()) for r in last.images] == [
        (r.sample, r.positions.tolist(), r.kept.tolist()) for r in ref_last.images
    ]
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


@pytest.mark.parametrize("family,method", [("llava", "hiprune"), ("qwen2_5_vl", "hiprune")])
def test_early_selection_under_generate(monkeypatch, family, method):
    """generate encodes the media before the prefill forward: the pre-hook selects."""
    reference, ref_last = _run(family, method, False, monkeypatch, generate=True)
    watcher = _SelectsAtTheLanguageModel(monkeypatch)
    out, last = _run(family, method, True, monkeypatch, generate=True)
    assert watcher.late == 0
    assert torch.equal(last.keep_mask, ref_last.keep_mask)
    assert torch.equal(out, reference)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava"])
def test_encoder_stage_selects_at_the_cut(monkeypatch, family):
    """stage="encoder": the language model's selection is made right after the cut layer (Qwen's
    encoder synchronises at its merger, after the cut) and adopted at the feature function's end."""
    reference, ref_last = _run(family, "hiprune", False, monkeypatch, stage="encoder")
    watcher = _SelectsAtTheLanguageModel(monkeypatch)
    at_cut = []
    original = base.Adapter._select_at_encoder_cut
    monkeypatch.setattr(base.Adapter, "_select_at_encoder_cut",
                        lambda adapter, *a: (at_cut.append(1), original(adapter, *a))[1])
    out, last = _run(family, "hiprune", True, monkeypatch, stage="encoder")
    assert watcher.late == 0
    if family == "llava":  # a full-attention ViT: no synchronisation inside the encoder to get ahead of
        assert not at_cut
    else:  # one selection per encoder call, made at its cut and adopted, not made again
        assert len(at_cut) >= 1 and watcher.total == len(at_cut)
    assert torch.equal(last.keep_mask, ref_last.keep_mask)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)


def test_methods_that_read_the_embeddings_select_at_the_language_model(monkeypatch):
    watcher = _SelectsAtTheLanguageModel(monkeypatch)
    _run("llava", "pool", True, monkeypatch)
    assert watcher.late == 1


def test_a_stale_early_selection_is_not_used(monkeypatch):
    """An encoder call outside a forward (get_image_features called directly) selects nothing early,
    and the next forward's selection is its own."""
    build, _ = _family_cases()["llava"]
    model, inputs = build()
    prune.wrap(model, "hiprune", keep=0.3)
    with torch.no_grad():
        expected = model(**inputs).logits
        other = torch.randn_like(inputs["pixel_values"])
        model.model.get_image_features(pixel_values=other)  # media without a prompt
        assert "early_selection" not in model.prune_state._scratch
        again = model(**inputs).logits
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_an_early_selection_that_fails_is_made_again_by_the_language_model_hook(monkeypatch):
    """The early path is an optimisation: where it raises, the language-model hook selects (and
    reports whatever goes wrong there, as it always did)."""
    reference, ref_last = _run("llava", "hiprune", False, monkeypatch)
    from prune.hooks.llava import LlavaAdapter

    layouts, failed = LlavaAdapter.layouts, []

    def flaky(adapter, *args, **kwargs):
        if not failed:
            failed.append(1)
            raise RuntimeError("the first selection fails")
        return layouts(adapter, *args, **kwargs)

    monkeypatch.setattr(LlavaAdapter, "layouts", flaky)
    watcher = _SelectsAtTheLanguageModel(monkeypatch)
    out, last = _run("llava", "hiprune", True, monkeypatch)
    assert failed and watcher.late == 1
    assert torch.equal(last.keep_mask, ref_last.keep_mask)
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
