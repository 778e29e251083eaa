"""Model shapes: shipped configs build the real architectures, random weights materialize correctly,
inputs carry the right number of placeholder tokens."""

import pytest
import torch
from PIL import Image

import prune
from prune.evaluation import models as M

REAL = {
    # name: (class, billions of parameters of the published checkpoint, +-)
    "llava-1.5-7b": ("LlavaForConditionalGeneration", 7.06),
    "llava-next-7b": ("LlavaNextForConditionalGeneration", 7.06),
    "llava-onevision-7b": ("LlavaOnevisionForConditionalGeneration", 8.03),
    "qwen2.5-vl-7b": ("Qwen2_5_VLForConditionalGeneration", 8.29),
    "qwen2.5-omni-7b": ("Qwen2_5OmniThinkerForConditionalGeneration", 8.93),
    "qwen3-vl-8b": ("Qwen3VLForConditionalGeneration", 8.77),
    "gemma-3-4b": ("Gemma3ForConditionalGeneration", 4.30),
    "internvl3.5-8b": ("InternVLForConditionalGeneration", 8.53),  # model card: 0.3B vision + 8.2B language
    # model card "9B"; the text model alone is 8.95B (as its GGUF conversions count it) + the 0.46B ViT;
    # the checkpoint's multi-token-prediction layer is not part of transformers' model
    "qwen3.5-9b": ("Qwen3_5ForConditionalGeneration", 9.41),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_size_shapes_build_the_published_architectures(name):
    spec = M.resolve_model(name)
    cls = M._model_class(spec)
    assert cls.__name__ == REAL[name][0]
    with torch.device("meta"):
        model = cls(M.build_config(spec))
    billions = M.parameter_count(model) / 1e9
    assert billions == pytest.approx(REAL[name][1], abs=0.05)


def test_every_shipped_shape_resolves_and_has_a_processor():
    names = set(M.shipped_models())
    assert set(REAL) | {"tiny-llava", "tiny-qwen2.5-vl"} <= names
    for name in names:
        spec = M.resolve_model(name)
        assert spec.name == name and not spec.pretrained
        assert M.build_image_processor(spec) is not None


def test_qwen_shape_keeps_the_7b_layout():
    config = M.build_config(M.resolve_model("qwen2.5-vl-7b"))
    assert config.vision_config.fullatt_block_indexes == [7, 15, 23, 31]
    assert config.vision_config.window_size == 112 and config.vision_config.out_hidden_size == 3584
    text = config.get_text_config()
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (
        3584,
        28,
        4,
        152064,
    )
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]


def test_qwen3_5_shape_keeps_the_9b_hybrid_layout():
    spec = M.resolve_model("qwen3.5-9b")
    config = M.build_config(spec)
    text = config.get_text_config()
    assert text.layer_types == (["linear_attention"] * 3 + ["full_attention"]) * 8
    assert (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim) == (4096, 16, 4, 256)
    assert (text.linear_num_key_heads, text.linear_num_value_heads, text.vocab_size) == (16, 32, 248320)
    assert text.rope_parameters["mrope_section"] == [11, 11, 10] and text.rope_parameters["mrope_interleaved"]
    assert config.vision_config.out_hidden_size == 4096 and not config.tie_word_embeddings
    with torch.device("meta"):
        model = M._model_class(spec)(config)
    vision = sum(p.numel() for p in model.model.visual.parameters())
    assert (M.parameter_count(model) - vision) / 1e9 == pytest.approx(8.95, abs=0.01)  # the text model's count


def test_misspelled_config_key_is_refused():
    spec = M.resolve_model("qwen2.5-vl-7b")
    spec.config["vision_config"]["in_chans"] = 3
    with pytest.raises(M.ModelSpecError, match="in_chans"):
        M.build_config(spec)


def test_unknown_model_names_the_choices(tmp_path):
    with pytest.raises(M.ModelSpecError, match="unknown model 'nope'.*llava-1.5-7b"):
        M.resolve_model("nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(M.ModelSpecError, match="no config.json"):
        M.resolve_model(str(tmp_path / "empty"))


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2.5-vl"])
def test_meta_built_model_matches_a_normal_construction(name):
    spec = M.resolve_model(name)
    model = M.build_model(spec, dtype=torch.float32, attn_implementation="eager")
    reference = M._model_class(spec)(M.build_config(spec))
    buffers = dict(model.named_buffers())
    assert buffers, "expected RoPE / position buffers"
    for key, value in reference.named_buffers():
        assert torch.equal(buffers[key], value), key  # e.g. RoPE inverse frequencies, not garbage
    expected = dict(reference.named_parameters())
    for key, p in model.named_parameters():  # initialized by the model's own scheme, not left empty
        p, ref = p.detach(), expected[key].detach()
        assert torch.isfinite(p).all(), key
        if p.numel() >= 256:
            assert float(p.std()) == pytest.approx(float(ref.std()), rel=0.25), key
            assert float(p.mean()) == pytest.approx(float(ref.mean()), abs=0.25 * float(ref.std()) + 1e-6), (
                key
            )


def test_random_weights_are_seeded():
    spec = M.resolve_model("tiny-llava")
    a = M.build_model(spec, dtype=torch.float32, seed=3)
    b = M.build_model(spec, dtype=torch.float32, seed=3)
    c = M.build_model(spec, dtype=torch.float32, seed=4)
    wa, wb, wc = (m.get_input_embeddings().weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


@pytest.mark.parametrize("name, before", [("tiny-llava", 64), ("tiny-qwen2.5-vl", 16)])
def test_inputs_have_one_placeholder_per_feature_and_prune(name, before):
    spec = M.resolve_model(name)
    model = M.build_model(spec, dtype=torch.float32, attn_implementation="eager")
    processor = M.build_image_processor(spec)
    images = [Image.new("RGB", spec.image_size[::-1], (120, 30, 200))] * 2
    inputs = M.make_inputs(model, processor, images, prompt_tokens=12, spec=spec)
    image_id = model.config.image_token_id
    assert (inputs["input_ids"] == image_id).sum(1).tolist() == [before, before]
    prune.wrap(model, "random", keep=0.25)
    with torch.no_grad():
        model(**inputs)
    record = model.prune_state.last
    assert record.vision_tokens_before == 2 * before
    assert record.vision_tokens_after == 2 * round(0.25 * before)


# the new families' shipped shapes with their layers shrunk: the benchmark's input path (processor,
# placeholder counts) and a pruned forward work on the real token layout (576 / 256 / 256 per image)
_SHRUNK_TEXT = {"hidden_size": 64, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                "num_key_value_heads": 1, "head_dim": 32}
_SHRUNK = {
    "qwen3-vl-8b": ({"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                     "deepstack_visual_indexes": [0, 1]}, 576),
    "gemma-3-4b": ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}, 256),
    "internvl3.5-8b": ({"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
                       256),
    "qwen3.5-9b": ({"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64},
                   576),
}


@pytest.mark.parametrize("name", sorted(_SHRUNK))
def test_new_family_shapes_make_inputs_that_prune(name):
    vision, per_image = _SHRUNK[name]
    spec = M.resolve_model(name)
    spec.config["vision_config"].update(vision)
    spec.config["text_config"].update(_SHRUNK_TEXT)
    if "layer_types" in spec.config["text_config"]:  # Qwen3.5: one linear-attention and one full-attention layer
        spec.config["text_config"].update(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                                          linear_num_value_heads=2, linear_key_head_dim=16, linear_value_head_dim=16)
    model = M.build_model(spec, dtype=torch.float32, attn_implementation="eager")
    processor = M.build_image_processor(spec)
    images = [Image.new("RGB", spec.image_size[::-1], (120, 30, 200))] * 2
    inputs = M.make_inputs(model, processor, images, prompt_tokens=12, spec=spec)
    assert (inputs["input_ids"] == model.config.image_token_id).sum(1).tolist() == [per_image, per_image]
    prune.wrap(model, "random", keep=0.25)
    with torch.no_grad():
        model(**inputs)
    record = model.prune_state.last
    assert (record.vision_tokens_before, record.vision_tokens_after) == (2 * per_image, 2 * round(0.25 * per_image))
