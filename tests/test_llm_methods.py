"""In-LLM pruning (FastV, TransPrune, PyramidDrop): a hand-written layer loop is the oracle."""

import pytest
import torch
from transformers import DynamicCache

import prune
from prune._compat import find_cache, with_cache
from prune._tiny import build_prompts, tiny_llava
from prune.methods import get_method
from prune.methods.llm import average_fraction
from tests.host_reads import watch_forward
from tests.oracle import full_inputs_embeds

GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
METHODS = ["fastv", "transprune", "pdrop"]


def make(attn="eager", prompts=((64,),), text_lens=(12,), seed=0, layers=8):
    model = tiny_llava(attn_implementation=attn, text_layers=layers, seed=seed)
    ids, mask = build_prompts([list(p) for p in prompts], list(text_lens), seed=seed)
    n_images = sum(len(p) for p in prompts)
    pv = torch.randn(n_images, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))
    return model, {"input_ids": ids, "attention_mask": mask, "pixel_values": pv}


def _causal(q, kv):
    return torch.full((q, kv), float("-inf")).triu(kv - q + 1)[None, None]


@torch.no_grad()
def layer_loop(model, embeds, positions, record, mode, steps=8):
    """Run decoder layers one by one on what ``record`` says each layer saw; greedy-decode on.

    embeds: (1, L, D) the unwrapped model's LM input; positions: (P, L) its positions (P = 1 for
    1-D RoPE, 3 for M-RoPE). Decoding continues at max(positions) + 1 (+ steps)."""
    lm = model.model.language_model
    length = embeds.shape[1]
    cache = DynamicCache(config=lm.config)
    cols = torch.arange(length)
    hidden = embeds
    layer_cols = []
    for i, layer in enumerate(lm.layers):
        seen = torch.nonzero(record.seen_by(i)[0], as_tuple=True)[0]
        if not torch.equal(seen, cols):
            hidden = hidden[:, torch.isin(cols, seen)]  # drop rows: run the rest on what is left
            cols = seen
        layer_cols.append(cols)
        pos = positions[:, cols] if mode == "original" else torch.arange(cols.numel())[None]
        pos = pos[:, None] if pos.shape[0] == 3 else pos  # M-RoPE: (3, 1, L)
        emb = lm.rotary_emb(hidden, pos)
        hidden = layer(hidden, **with_cache(layer.forward, cache, attention_mask=_causal(cols.numel(), cols.numel()),
                                            position_embeddings=emb, use_cache=True))
    logits = model.lm_head(lm.norm(hidden))[0]
    tokens, nxt = [], logits[-1].argmax()
    start = int(positions.max()) + 1
    for step in range(steps):
        tokens.append(int(nxt))
        hidden = model.get_input_embeddings()(nxt.view(1, 1))
        for i, layer in enumerate(lm.layers):
            seen = layer_cols[i].numel()
            value = start + step if mode == "original" else seen + step
            pos = torch.full((3, 1, 1), value) if positions.shape[0] == 3 else torch.tensor([[value]])
            hidden = layer(hidden, **with_cache(layer.forward, cache, attention_mask=_causal(1, seen + step + 1),
                                                position_embeddings=lm.rotary_emb(hidden, pos), use_cache=True))
        nxt = model.lm_head(lm.norm(hidden))[0, -1].argmax()
    return logits, tokens


@pytest.mark.parametrize("method", METHODS)
def test_identity_at_keep_one(method):
    model, inputs = make()
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, method, keep=1.0)
        torch.testing.assert_close(model(**inputs).logits, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", METHODS)
def test_oracle_layer_loop(method, positions):
    model, inputs = make(prompts=((64, 64),), text_lens=(14,))
    prune.wrap(model, method, keep=0.45, positions=positions)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    assert len(record.layer_masks) >= 2  # at least one cut happened
    prune.unwrap(model)
    embeds = full_inputs_embeds(model, inputs)
    ref_logits, ref_tokens = layer_loop(model, embeds, torch.arange(embeds.shape[1])[None], record, positions)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens


@pytest.mark.parametrize("method", METHODS)
def test_kv_cache_holds_what_each_layer_saw(method):
    model, inputs = make(prompts=((64,), (64,)), text_lens=(6, 15))
    prune.wrap(model, method, keep=0.4)
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    record = model.prune_state.last
    cache = find_cache(out)
    for i in range(len(model.model.language_model.layers)):
        seen = record.seen_by(i)
        width = int(seen.sum(1).max())  # rows re-padded on the left to the longest prompt
        assert cache.layers[i].keys.shape[-2] == width


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_singles(method, positions):
    # rows of different lengths: each cut re-pads them, and the padding it adds has no position
    prompts, lens = ((64,), (64, 64), (), (64,)), (5, 14, 9, 20)
    model, inputs = make(prompts=prompts, text_lens=lens, seed=2)
    prune.wrap(model, method, keep=0.4, positions=positions)
    with torch.no_grad():
        out = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        batch_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        starts = [0]
        for p in prompts:
            starts.append(starts[-1] + len(p))
        for row in range(len(prompts)):
            real = inputs["attention_mask"][row].bool()
            single = {"input_ids": inputs["input_ids"][row][real][None]}
            single["attention_mask"] = torch.ones_like(single["input_ids"])
            if len(prompts[row]):
                single["pixel_values"] = inputs["pixel_values"][starts[row] : starts[row + 1]]
            o = model.generate(**single, **GEN, return_dict_in_generate=True, output_logits=True)
            assert o.sequences[0, single["input_ids"].shape[1] :].tolist() == batch_tokens[row].tolist()
            torch.testing.assert_close(o.logits[0][0], out.logits[0][row], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_eager_and_sdpa_agree(method):
    results = {}
    for attn in ("eager", "sdpa"):
        model, inputs = make(attn=attn, prompts=((64,), (64,)), text_lens=(4, 10))
        prune.wrap(model, method, keep=0.4)
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
        results[attn] = ([m for _, m in model.prune_state.last.layer_masks], logits, tokens)
    assert all(torch.equal(a, b) for a, b in zip(results["eager"][0], results["sdpa"][0]))
    # padding rows are fully masked and differ by backend: compare the prompts' last tokens
    torch.testing.assert_close(results["eager"][1][:, -1], results["sdpa"][1][:, -1], atol=1e-4, rtol=1e-4)
    assert torch.equal(results["eager"][2], results["sdpa"][2])


def test_unwrap_restores_and_schedule_override():
    model, inputs = make()
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, "fastv", schedule=[(3, 0.25)])
        model(**inputs)
        layers = [first for first, _ in model.prune_state.last.layer_masks]
        assert layers == [0, 3]
        assert model.prune_state.last.images[0].tokens_after == 16
        prune.unwrap(model)
        torch.testing.assert_close(model(**inputs).logits, ref, atol=0, rtol=0)


def test_fastv_matches_output_attentions():
    model, inputs = make(prompts=((64,),), text_lens=(10,), layers=6)
    k, keep_fraction = 3, 0.375
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[k - 1][0]  # (H, L, L)
        prune.wrap(model, "fastv", schedule=[(k, keep_fraction)])
        model(**inputs)
    vision = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id, as_tuple=True)[0]
    score = att.mean(0)[-1, vision]  # last token's row, head mean
    expected = set(vision[torch.topk(score, round(keep_fraction * 64)).indices].tolist())
    seen = model.prune_state.last.seen_by(k)[0]
    assert set(torch.nonzero(seen, as_tuple=True)[0].tolist()) & set(vision.tolist()) == expected


def test_transprune_matches_reference_from_hidden_states_and_attention():
    model, inputs = make(prompts=((64,),), text_lens=(10,), layers=6)
    cut, fraction, first = 3, 0.5, 1
    lm = model.model.language_model
    saved = {}

    def grab(name):
        def hook(module, args, output):
            saved[name] = output[0] if isinstance(output, tuple) else output
        return hook

    handles = []
    for i in range(first, cut):
        layer = lm.layers[i]
        handles += [layer.input_layernorm.register_forward_hook(grab(f"a_in{i}")),
                    layer.self_attn.register_forward_hook(grab(f"a_out{i}")),
                    layer.post_attention_layernorm.register_forward_hook(grab(f"m_in{i}")),
                    layer.mlp.register_forward_hook(grab(f"m_out{i}"))]
    with torch.no_grad():
        att = model(**inputs, output_attentions=True).attentions[cut][0]  # layer `cut` on all tokens
    for h in handles:
        h.remove()
    ids = inputs["input_ids"][0]
    vision = torch.nonzero(ids == model.config.image_token_id, as_tuple=True)[0]

    def transition(before, after):
        before, after = before[0], after[0]
        ratio = after.norm(dim=-1) / before.norm(dim=-1)
        necc = torch.exp(1 - torch.nn.functional.cosine_similarity(before, after, dim=-1))
        return ratio * necc / necc.sum()

    ttv = sum(transition(saved[f"a_in{i}"], saved[f"a_out{i}"]) + transition(saved[f"m_in{i}"], saved[f"m_out{i}"])
              for i in range(first, cut))[vision]
    instruction = torch.arange(int(vision[-1]) + 1, ids.numel())
    iga = att.mean(0)[instruction][:, vision].mean(0)
    score = ttv / ttv.sum() + iga / iga.sum()
    expected = set(vision[torch.topk(score, round(fraction * 64)).indices].tolist())
    prune.wrap(model, "transprune", schedule=[(cut, fraction)], accumulate=(first, 4))
    with torch.no_grad():
        model(**inputs)
    seen = model.prune_state.last.seen_by(cut)[0]
    assert set(torch.nonzero(seen, as_tuple=True)[0].tolist()) & set(vision.tolist()) == expected


def test_schedules_average_keep_and_bad_input():
    for name in METHODS:
        method = get_method(name)()
        schedule = method.schedule(32, 0.3)
        assert abs(average_fraction(schedule, 32) - 0.3) < 1e-6
    reference = get_method("transprune")().schedule(32, 0.41015625)  # the reference's own average
    assert [layer for layer, _ in reference] == [7, 9, 12]
    assert [f for _, f in reference] == pytest.approx([0.875, 0.625, 0.125], rel=1e-9)
    with pytest.raises(ValueError, match="cannot average"):
        get_method("fastv")(layer=16).schedule(32, 0.2)
    with pytest.raises(ValueError, match="must not grow"):
        get_method("pdrop")(schedule=[(4, 0.5), (8, 0.7)]).schedule(32, 0.5)
    with pytest.raises(ValueError, match="average fraction"):
        get_method("fastv")().schedule(32, 100)


@pytest.mark.parametrize("method", METHODS)
def test_qwen25_oracle_and_batch(method):
    from prune._tiny import tiny_qwen_vl
    from tests.oracle import qwen_full_inputs
    from tests.test_qwen import make_inputs, select_rows

    prompts = [[("image", (1, 8, 12))], [("image", (1, 12, 8)), ("video", (2, 8, 8))], []]
    inputs = make_inputs(prompts, [5, 14, 9], seed=4)
    model = prune.wrap(tiny_qwen_vl("2.5", text_layers=8), method, keep=0.45)
    assert model.prune_state.positions == "original"  # M-RoPE keeps (t, h, w) ids
    with torch.no_grad():
        batch_tokens = model.generate(**inputs, **GEN)[:, inputs["input_ids"].shape[1] :]
        for row in range(len(prompts)):
            single = select_rows(prompts, inputs, [row])
            tokens = model.generate(**single, **GEN)[0, single["input_ids"].shape[1] :]
            assert tokens.tolist() == batch_tokens[row].tolist()
        single = select_rows(prompts, inputs, [1])
        logits = model(**single).logits[0]
        record = model.prune_state.last
        generated = model.generate(**single, **GEN)[0, single["input_ids"].shape[1] :].tolist()
    assert len(record.layer_masks) >= 2
    prune.unwrap(model)
    embeds, positions = qwen_full_inputs(model, single)
    ref_logits, ref_tokens = layer_loop(model, embeds, positions[:, 0], record, "original")
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens


@pytest.mark.parametrize("method", METHODS)
def test_llava_next_batch_equals_singles(method):
    from tests.conftest import Case

    case = Case("llava_next", prompts=((0,), (1, 2), ()), text_lens=(5, 14, 9), seed=3, text_layers=8)
    model = prune.wrap(case.model, method, keep=0.4)
    with torch.no_grad():
        batch = case.inputs()
        out = model.generate(**batch, **GEN)[:, batch["input_ids"].shape[1] :]
        assert len(model.prune_state.last.layer_masks) >= 2  # a cut happened
        for row in range(3):
            single = case.inputs([row])
            tokens = model.generate(**single, **GEN)[0, single["input_ids"].shape[1] :]
            assert tokens.tolist() == out[row].tolist()


@pytest.mark.parametrize("method,layers,keep", [("transprune", 30, 0.22), ("pdrop", 30, 0.05), ("fastv", 30, 0.05)])
def test_keep_below_the_first_cut_floor_is_refused(method, layers, keep):
    # the layers before the first cut see every vision token: a lower average cannot be honoured, and
    # silently dropping all vision tokens instead (what a clamped solver did) would mislabel the point
    from prune.methods import get_method
    from prune.methods.llm import average_fraction

    m = get_method(method)()
    with pytest.raises(ValueError, match="cannot average"):
        m.schedule(layers, keep)
    ok = m.schedule(layers, 0.33)
    assert abs(average_fraction(ok, layers) - 0.33) < 1e-6
    assert all(fraction > 0 for _, fraction in ok)


@pytest.mark.parametrize("method", METHODS)
def test_keep_exactly_at_the_floor_is_refused(method):
    # 8 layers, first cut at layer 2 for all three: keep=0.25 would leave layers 2.. with no vision token
    model, _ = make()
    with pytest.raises(ValueError, match="cannot average keep=0.25 on 8 layers"):
        prune.wrap(model, method, keep=0.25)
    assert get_method(method)().min_keep(8) == 0.25
    from prune.evaluation.demo import llm_keep

    assert llm_keep(method, 0.25, 8) == 0.4 and llm_keep(method, 0.3, 8) == 0.3 and llm_keep("cls", 0.25, 8) == 0.25


def test_fastv_ratio_and_keep():
    model, inputs = make()
    with pytest.raises(ValueError, match="keep=1.0 keeps every vision token but ratio=0.5"):
        prune.wrap(model, "fastv", keep=1.0, ratio=0.5)
    with pytest.raises(ValueError, match="keep=1.0 keeps every vision token but schedule"):
        prune.wrap(model, "pdrop", keep=1.0, schedule=[(2, 0.5)])
    for bad, error in (({"ratio": 1.0}, ValueError), ({"ratio": -0.1}, ValueError), ({"ratio": "half"}, TypeError),
                       ({"layer": 0}, ValueError), ({"layer": 2.5}, TypeError), ({"score_dtype": "fp8"}, ValueError),
                       ({"ratio": 0.5, "schedule": [(2, 0.5)]}, ValueError)):
        with pytest.raises(error, match=next(iter(bad)) if len(bad) == 1 else "not both"):
            prune.wrap(model, "fastv", **bad)
    with pytest.raises(ValueError, match="layers"):
        prune.wrap(model, "pdrop", layers=(0, 4))
    with pytest.raises(TypeError, match="use_attention"):
        prune.wrap(model, "transprune", use_attention="yes")
    # (K, R) directly: layer 3 sees 1 - R of the 64 vision tokens, whatever keep says
    prune.wrap(model, "fastv", layer=3, ratio=0.75)
    with torch.no_grad():
        model(**inputs)
    assert [first for first, _ in model.prune_state.last.layer_masks] == [0, 3]
    assert model.prune_state.last.images[0].tokens_after == 16


@pytest.mark.parametrize("method", METHODS)
def test_the_cut_never_reads_the_device_between_layers(monkeypatch, method):
    """No read of a device tensor in prune's code over the whole forward (tests/host_reads.py follows
    which tensors would be on a GPU; prune's reads of its own host copies cost nothing there). Ragged
    prompts: transformers' own test of their padding mask reads, and is not prune's."""
    model, inputs = make(prompts=((64,), (64, 64)), text_lens=(6, 11))
    with watch_forward(monkeypatch, inputs) as mode:
        prune.wrap(model, method, keep=0.4)
        with torch.no_grad(), mode.window():
            model(**inputs)
    assert len(model.prune_state.last.layer_masks) >= 2  # it cut
    assert mode.reads_in("/prune/") == [], "\n".join(mode.reads_in("/prune/")[:3])
