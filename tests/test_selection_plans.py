"""A selection call's host plan (budgets, which views are ranked, where every token sits, those indices
on the device) is kept per call structure (``Adapter._call_plan``) and reused by every later call of
the same layouts and placeholder positions. The plan depends on shapes only: a reused plan must give
exactly the selection a fresh wrap computes, for data-dependent methods on new data too."""

import copy

import pytest
import torch

import prune
from tests.test_select_batch import _family_cases

CASES = [
    ("llava", "random"), ("llava", "cls"), ("llava", "hiprune"), ("llava", "pool"), ("llava_next", "hiprune"),
    ("qwen2_5_vl", "hiprune"), ("qwen2_vl", "random"),
]
MEDIA = ("pixel_values", "pixel_values_videos")


def _other_media(inputs, seed=11):
    """The same inputs with new pixel values of the same shapes."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) if k in MEDIA else v for k, v in inputs.items()}


def _prefill(model, inputs):
    with torch.no_grad():
        logits = model(**inputs).logits
    return logits, model.prune_state.last.keep_mask.clone()


def _fresh(family, method, inputs):
    """The answer of a model wrapped just now (no plan kept yet)."""
    model, _ = _family_cases()[family][0]()
    prune.wrap(model, method, keep=0.3)
    return _prefill(model, inputs)


@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_a_kept_plan_gives_the_fresh_selection_on_new_data(family, method):
    model, inputs = _family_cases()[family][0]()
    prune.wrap(model, method, keep=0.3)
    _, first_keep = _prefill(model, inputs)
    plans = dict(model.prune_state._selection_plans)
    assert plans, "the first call keeps its plan"
    other = _other_media(inputs)
    logits, keep = _prefill(model, other)
    kept_now = model.prune_state._selection_plans
    assert kept_now.keys() == plans.keys() and all(kept_now[k] is plans[k] for k in plans), "the plan is reused"
    fresh_logits, fresh_keep = _fresh(family, method, other)
    assert torch.equal(keep, fresh_keep)
    torch.testing.assert_close(logits, fresh_logits)
    if method in ("cls", "hiprune"):  # data-dependent: the test would see a selection carried over
        assert not torch.equal(keep, first_keep)


def test_a_new_prompt_layout_gets_its_own_plan():
    family, method = "llava", "hiprune"
    model, inputs = _family_cases()[family][0]()
    prune.wrap(model, method, keep=0.3)
    _prefill(model, inputs)
    # two more text tokens in front of every prompt: every placeholder moves
    shifted = dict(inputs, input_ids=torch.cat([inputs["input_ids"][:, :2], inputs["input_ids"]], 1),
                   attention_mask=torch.cat([inputs["attention_mask"][:, :2], inputs["attention_mask"]], 1))
    logits, keep = _prefill(model, shifted)
    assert len(model.prune_state._selection_plans) == 2
    fresh_logits, fresh_keep = _fresh(family, method, shifted)
    assert torch.equal(keep, fresh_keep)
    torch.testing.assert_close(logits, fresh_logits)


def test_copies_start_without_plans_and_agree():
    model, inputs = _family_cases()["llava"][0]()
    prune.wrap(model, "hiprune", keep=0.3)
    logits, keep = _prefill(model, inputs)
    twin = copy.deepcopy(model)
    assert twin.prune_state._selection_plans == {}
    twin_logits, twin_keep = _prefill(twin, _other_media(inputs))
    own_logits, own_keep = _prefill(model, _other_media(inputs))
    assert torch.equal(twin_keep, own_keep)
    torch.testing.assert_close(twin_logits, own_logits)


def test_plans_are_bounded():
    from prune.hooks import base

    model, inputs = _family_cases()["llava"][0]()
    prune.wrap(model, "random", keep=0.3)
    for extra in range(base._PLANS_KEPT + 3):  # ever-new placeholder positions
        ids = torch.cat([inputs["input_ids"][:, :1].expand(-1, extra), inputs["input_ids"]], 1)
        mask = torch.cat([inputs["attention_mask"][:, :1].expand(-1, extra), inputs["attention_mask"]], 1)
        _prefill(model, dict(inputs, input_ids=ids, attention_mask=mask))
        assert len(model.prune_state._selection_plans) <= base._PLANS_KEPT
