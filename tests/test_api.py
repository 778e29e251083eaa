"""Public API: bad input, wrap/unwrap reversibility, isolation, pass-through, records."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prune
from prune._tiny import tiny_llava
from prune.hooks.attention_tap import _ConfigView


def test_available_methods_describe_each_method():
    methods = prune.available_methods()
    assert {"random", "pool", "cls", "hiprune"} <= set(methods)
    assert all(isinstance(d, str) and d for d in methods.values())


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"method": "nope"}, ValueError, "unknown method 'nope'"),
        ({"keep": 0.0}, ValueError, "keep=0.0"),
        ({"keep": 1.5}, ValueError, "keep=1.5"),
        ({"keep": -0.2}, ValueError, "keep=-0.2"),
        ({"keep": 0}, ValueError, "keep=0"),
        ({"keep": "half"}, TypeError, "keep must be"),
        ({"keep": True}, TypeError, "keep must be"),
        ({"positions": "sideways"}, ValueError, "positions"),
        ({"method": "hiprune", "alpah": 0.2}, TypeError, "alpah"),
        ({"method": "cls", "variant": "best"}, ValueError, "variant"),
    ],
)
def test_bad_arguments_name_the_problem(kwargs, error, words):
    model = tiny_llava()
    args = {"method": "hiprune", "keep": 0.5, **kwargs}
    with pytest.raises(error, match=words):
        prune.wrap(model, **args)
    assert not hasattr(model, "prune_state")


def test_unsupported_model_class():
    lm = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32
        )
    )
    with pytest.raises(TypeError, match="does not support LlamaForCausalLM"):
        prune.wrap(lm, "random", keep=0.5)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        prune.wrap("not a model", "random", keep=0.5)


def test_cls_refuses_encoder_without_cls():
    from prune.methods import EncoderInfo, get_method

    method = get_method("cls")()
    with pytest.raises(ValueError, match="needs a \\[CLS\\] token.*hiprune"):
        method.bind(EncoderInfo(num_layers=4, feature_layer=2, has_cls=False, family="llava_onevision"))


def test_config_object_and_rewrap_replace_config(make_case):
    case = make_case("llava")
    model = prune.wrap(case.model, prune.PruneConfig(method="random", keep=8))
    with torch.no_grad():
        model(**case.inputs())
    assert model.prune_state.last.vision_tokens_after == 8
    prune.wrap(model, "hiprune", keep=0.5)  # replaces, does not stack
    assert model.prune_state.config.method == "hiprune"
    taps = [m for m in model.modules() if isinstance(getattr(m, "config", None), _ConfigView)]
    assert len(taps) == 2  # object layer and deep layer only
    with torch.no_grad():
        model(**case.inputs())
    assert model.prune_state.last.vision_tokens_after == 32
    with pytest.raises(TypeError, match="either a PruneConfig"):
        prune.wrap(model, prune.PruneConfig(), alpha=0.3)


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_unwrap_restores_everything(make_case):
    case = make_case("llava")
    model = case.model
    inputs = case.inputs()
    with torch.no_grad():
        ref = model(**inputs).logits  # transformers installs its own output-capture hooks on first use
    hooks_before = _hook_count(model)
    configs_before = {name: m.config for name, m in model.named_modules() if hasattr(m, "config")}
    with torch.no_grad():
        prune.wrap(model, "cls", keep=0.3)
        assert model(**inputs).logits.shape[1] < ref.shape[1]
        prune.unwrap(model)
        out = model(**inputs).logits
    assert _hook_count(model) == hooks_before
    assert "get_image_features" not in model.model.__dict__
    assert {name: m.config for name, m in model.named_modules() if hasattr(m, "config")} == configs_before
    assert not hasattr(model, "prune_state")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match="not wrapped"):
        prune.unwrap(model)


def test_two_wrapped_models_do_not_interfere(make_case):
    a, b = make_case("llava"), make_case("llava")
    fresh = make_case("llava")
    prune.wrap(a.model, "hiprune", keep=0.5)
    prune.wrap(b.model, "random", keep=4)
    with torch.no_grad():
        a.model(**a.inputs())
        b.model(**b.inputs())
        ref = fresh.model(**fresh.inputs()).logits
    assert a.model.prune_state.last.vision_tokens_after == 32
    assert b.model.prune_state.last.vision_tokens_after == 4
    # an unwrapped model of the same class in the same process is untouched
    torch.testing.assert_close(fresh.model(**fresh.inputs()).logits, ref, atol=0, rtol=0)


def test_prompt_without_images_passes_through(make_case):
    case = make_case("llava", prompts=((),), text_lens=(12,))
    inputs = case.inputs()
    with torch.no_grad():
        ref = case.model(**inputs).logits
        prune.wrap(case.model, "hiprune", keep=0.2)
        out = case.model(**inputs).logits
        gen = case.model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    assert gen.shape[1] == inputs["input_ids"].shape[1] + 4
    assert case.model.prune_state.last.images == []


def test_budget_rule_and_record(make_case):
    case = make_case("llava", prompts=((0, 1),))
    model = prune.wrap(case.model, "random", keep=0.33)
    with torch.no_grad():
        model(**case.inputs())
    last = model.prune_state.last
    assert last.keep_mask.dtype == torch.bool
    assert last.keep_mask.shape == case.inputs()["input_ids"].shape
    assert [im.tokens_after for im in last.images] == [round(0.33 * 64)] * 2
    prune.wrap(model, "random", keep=1000)  # absolute counts are capped at N
    with torch.no_grad():
        model(**case.inputs())
    assert model.prune_state.last.vision_tokens_after == 128


def test_stale_encoder_call_and_precomputed_features(make_case):
    import inspect

    case = make_case("llava", prompts=((0,),))
    inputs = case.inputs()
    with torch.no_grad():
        precomputed = case.model.model.get_image_features(pixel_values=inputs["pixel_values"], return_dict=True)
        model = prune.wrap(case.model, "hiprune", keep=0.25)
        model.model.get_image_features(pixel_values=inputs["pixel_values"])  # a user's own call
        text_only = make_case("llava", prompts=((),), text_lens=(9,)).inputs()
        model(**text_only)  # must not prune with the stale images
        assert model.prune_state.last.images == []
        if "mm_encoder_outputs" not in inspect.signature(model.forward).parameters:
            return  # transformers < 5.2x has no pre-computed features
        model.prune_state._media.clear()
        with pytest.warns(UserWarning, match="not pruned"):
            model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                  mm_encoder_outputs={"image": precomputed})
