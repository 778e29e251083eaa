"""The FLOPs counter against a hand computation, and against the equal-FLOPs schedules."""

import pytest
import torch
from transformers import LlamaConfig

import prune
from prune._tiny import build_prompts, tiny_llava
from prune.evaluation.flops import prefill_flops, record_flops


def test_prefill_flops_hand_computation():
    cfg = LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, num_key_value_heads=1,
                      num_hidden_layers=2, vocab_size=10)
    (layer,) = prefill_flops(cfg, [5], [3])
    # head_dim 4: q,o: 2*2*5*8*8 = 1280; k,v: 2*2*5*8*4 = 640; scores: 2*2*5*5*2*4 = 800
    assert layer.attention == 1280 + 640 + 800
    # gated MLP: 3 * 2 * 5 * 8 * 16 = 3840
    assert layer.mlp == 3840
    # linear per token: (1280 + 640) / 5 + 3840 / 5 = 1152; three vision tokens
    assert layer.vision_linear == 3 * 1152
    assert layer.total == 1280 + 640 + 800 + 3840


@pytest.mark.parametrize("method", ["fastv", "pdrop", "transprune"])
def test_equal_flops_schedule_halves_vision_flops(method):
    model = tiny_llava(text_layers=16)
    ids, mask = build_prompts([[64]], [12])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(1, 3, 32, 32)}
    with torch.no_grad():
        prune.wrap(model, "random", keep=1.0)
        model(**inputs)
        full = record_flops(model, model.prune_state.last)
        prune.wrap(model, method, keep=0.5)
        model(**inputs)
        pruned = record_flops(model, model.prune_state.last)
    ratio = sum(layer.vision_linear for layer in pruned) / sum(layer.vision_linear for layer in full)
    assert ratio == pytest.approx(0.5, abs=1 / 64)  # rounding: at most one token per layer
    assert sum(layer.total for layer in pruned) < sum(layer.total for layer in full)
    assert [layer.tokens for layer in full] == [12 + 1 + 64] * 16


def test_vision_side_record_counts_kept_tokens():
    model = prune.wrap(tiny_llava(), "hiprune", keep=0.25)
    ids, mask = build_prompts([[64]], [10])
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(1, 3, 32, 32))
    layers = record_flops(model, model.prune_state.last)
    assert [layer.vision_tokens for layer in layers] == [16, 16]
    assert [layer.tokens for layer in layers] == [11 + 16] * 2
