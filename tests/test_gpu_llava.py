"""The same contracts on a CUDA device (run on the GPU machine: ``pytest -m gpu``)."""

import pytest
import torch

import prune
from tests.oracle import full_inputs_embeds, reduced_positions

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}


def _to(inputs, device):
    return {k: v.to(device) for k, v in inputs.items()}


@cuda
@pytest.mark.parametrize("family", ["llava", "llava_next"])
@pytest.mark.parametrize("method", ["random", "pool", "cls", "hiprune"])
def test_cuda_batch_equals_singles_and_oracle(make_case, family, method):
    case = make_case(family, attn="sdpa", prompts=((0,), (1, 2), (), (3,)), text_lens=(5, 14, 9, 20), seed=3)
    model = prune.wrap(case.model.cuda(), method, keep=0.3)
    with torch.no_grad():
        batch = _to(case.inputs(), "cuda")
        out = model.generate(**batch, **GEN)[:, batch["input_ids"].shape[1] :]
        for row in range(4):
            single = _to(case.inputs([row]), "cuda")
            tokens = model.generate(**single, **GEN)[0, single["input_ids"].shape[1] :]
            assert tokens.tolist() == out[row].tolist()
        # prefill logits of one prompt equal the language model run on the kept rows
        single = _to(case.inputs([1]), "cuda")
        logits = model(**single).logits[0]
        keep = model.prune_state.last.keep_mask[0]
        merged = method == "pool"
        prune.unwrap(model)
        if not merged:
            embeds = full_inputs_embeds(model, single)[0][keep]
            pos = reduced_positions(keep.cpu(), "compact").cuda()
            lm = model.model.language_model(inputs_embeds=embeds[None], position_ids=pos[None])
            ref = model.lm_head(lm.last_hidden_state)[0]
            torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


@cuda
def test_cuda_bf16_generate_runs():
    from prune._tiny import build_prompts, tiny_llava

    model = tiny_llava(attn_implementation="sdpa").to("cuda", torch.bfloat16)
    ids, mask = build_prompts([[64], [64, 64]], [6, 11])
    pv = torch.randn(3, 3, 32, 32, device="cuda", dtype=torch.bfloat16)
    prune.wrap(model, "hiprune", keep=0.25)
    out = model.generate(input_ids=ids.cuda(), attention_mask=mask.cuda(), pixel_values=pv, **GEN)
    assert out.shape == (2, ids.shape[1] + 8)
    assert model.prune_state.last.vision_tokens_after == 3 * 16


def _synchronisations(fn) -> int:
    """How many times ``fn`` made the host wait for the GPU (torch's sync debug mode, as warnings)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


@cuda
@pytest.mark.parametrize("method", ["fastv", "pdrop", "transprune"])
def test_cuda_in_llm_prefill_reads_the_device_once(make_case, method):
    """An in-LLM call reads the device twice per prefill (each prompt's placeholder counts, then its
    vision and instruction counts); the ranking and masks of every cut stay on the device (sizes
    follow from those counts), so the host never waits between layers."""
    case = make_case("llava", attn="sdpa", prompts=((0,), (1,)), text_lens=(6, 11), seed=1, text_layers=6)
    model = case.model.cuda()
    batch = _to(case.inputs(), "cuda")
    with torch.no_grad():
        model(**batch)  # warm-up: lazy initialisations are not the cut's
        base = _synchronisations(lambda: model(**batch))
        prune.wrap(model, method, keep=0.5)
        model(**batch)
        pruned = _synchronisations(lambda: model(**batch))
    assert pruned - base <= 2, (base, pruned)
