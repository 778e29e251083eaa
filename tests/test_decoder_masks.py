"""The masks an in-LLM cut builds for its stages equal the ones transformers builds (same form,
same values), so building them without transformers' host read changes nothing."""

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.masking_utils import create_causal_mask

from prune._compat import call_with_cache
from prune.hooks.decoder_cut import causal_like


def _config(attn):
    config = LlamaConfig(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32,
                         vocab_size=32)
    config._attn_implementation = attn
    return config


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padding", [(0, 0, 0), (0, 3, 1), (5, 0, 2)])
@pytest.mark.parametrize("queries", [None, 1, 2])  # None: a prefill over every key
def test_stage_mask_equals_transformers(attn, padding, queries):
    config = _config(attn)
    keys = 9
    mask2d = torch.ones(len(padding), keys, dtype=torch.long)
    for row, pad in enumerate(padding):
        mask2d[row, :pad] = 0  # left padding
    q = keys if queries is None else queries
    hidden = torch.randn(len(padding), q, 16)
    cache = DynamicCache(config=config)
    if q < keys:  # a decode step: the cache holds the keys before the queries
        cache.update(torch.zeros(len(padding), 2, keys - q, 8), torch.zeros(len(padding), 2, keys - q, 8), 0)
    positions = torch.arange(keys - q, keys).expand(len(padding), q)
    ref = call_with_cache(create_causal_mask, cache, config=config, inputs_embeds=hidden, attention_mask=mask2d,
                          position_ids=positions)
    ours = causal_like(ref, hidden, mask2d, cache, config)
    if ref is None:  # transformers relies on SDPA's is_causal: ours must be exactly the causal mask
        ours = causal_like(None, hidden, mask2d, cache, config)
        expected = torch.ones(q, keys, dtype=torch.bool).tril(keys - q).expand(len(padding), 1, q, keys)
        assert torch.equal(ours, expected)
    else:
        assert ours.dtype == ref.dtype and ours.shape == ref.shape
        assert torch.equal(ours, ref)


def test_unknown_forms_are_left_to_transformers():
    from transformers import StaticCache

    config = _config("sdpa")
    hidden, mask2d = torch.randn(1, 4, 16), torch.ones(1, 4, dtype=torch.long)
    assert causal_like(None, hidden, mask2d, None, _config("eager")) is None  # eager always has a mask
    static = StaticCache(config=config, max_cache_len=8)
    assert causal_like(torch.ones(1, 1, 4, 8, dtype=torch.bool), hidden, mask2d, static, config) is None
    assert causal_like(object(), hidden, mask2d, None, config) is None  # e.g. a flex BlockMask


def test_last_instruction_row_of_right_padded_prompts():
    """PyramidDrop's query row when a prompt's padding follows its text: the last real row after its
    last vision row, or the last column where there is none (as the per-prompt search picks it)."""
    from prune.hooks.decoder_cut import last_instruction_row

    real = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    vision = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert last_instruction_row(real, vision)[:, 0].tolist() == [3, 5, 5]
