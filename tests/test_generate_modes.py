"""Everything a user does with a wrapped model: beam search, sampling, multi-turn, static cache,
copies, pickles, threads, mixed batches, bad options."""

import copy
import io
import threading

import pytest
import torch

import prune
from prune._compat import cache_parameter, find_cache, with_cache
from tests.oracle import full_inputs_embeds
from tests.test_qwen import KINDS, make_inputs

GEN = {"max_new_tokens": 5, "min_new_tokens": 5}
VISION = ["random", "hiprune"]


def _llava(make_case, prompts=((0,),), text_layers=2, family="llava", **kw):
    return make_case(family, prompts=prompts, text_lens=(9,) * len(prompts), text_layers=text_layers, **kw)


def _new_tokens(out, inputs):
    seq = out.sequences if hasattr(out, "sequences") else out
    return seq[:, inputs["input_ids"].shape[1] :]


# ---- beam search, sampling, num_return_sequences ----------------------------------------------------


@pytest.mark.parametrize("method, mode, family", [(m, mode, "llava") for m in VISION + ["pool"] for mode in ("beams", "sample2")]
                         + [("hiprune", "beams", "llava_next"), ("cls", "sample2", "llava_next")])
def test_expanded_generate_equals_the_language_model_on_the_reduced_embeds(make_case, method, mode, family):
    """generate expands the batch (beams, num_return_sequences) after the encoder ran once: every
    expanded row is the same prompt with the same kept set; the oracle is the unwrapped model's own
    generate with the same decoding arguments on the reduced inputs_embeds (compact positions)."""
    case = _llava(make_case, family=family)
    inputs = case.inputs()
    args = {"num_beams": 2, "num_return_sequences": 2, "do_sample": False} if mode == "beams" else \
        {"do_sample": True, "num_return_sequences": 2, "top_k": 5}
    model = prune.wrap(case.model, method, keep=0.3, positions="compact")
    with torch.no_grad():
        torch.manual_seed(0)
        out = model.generate(**inputs, **GEN, **args)
        record = model.prune_state.last
        assert record.keep_mask.shape[0] == 2 and (record.keep_mask[0] == record.keep_mask[1]).all()
        kept = record.keep_mask[0]
        embeds = model.prune_state.last.images[0].merged if method == "pool" else None
        prune.unwrap(model)
        full = full_inputs_embeds(model, inputs)[0]
        reduced = full[kept]
        if embeds is not None:  # merged rows: the record holds them
            reduced = reduced.clone()
            pos = record.images[0].positions[record.images[0].kept]
            rows = torch.nonzero(kept, as_tuple=True)[0]
            reduced[torch.isin(rows, pos)] = embeds
        torch.manual_seed(0)
        ref = model.generate(inputs_embeds=reduced[None], attention_mask=torch.ones(1, reduced.shape[0], dtype=torch.long),
                             **GEN, **args)
    assert _new_tokens(out, inputs).tolist() == ref.tolist()


@pytest.mark.parametrize("method", ["random", "hiprune"])
def test_qwen_beam_search_keeps_one_set_per_prompt(method):
    from prune._tiny import tiny_qwen_vl

    model = tiny_qwen_vl("2.5")
    inputs = make_inputs([KINDS["image"], KINDS["video"]], [9, 6])
    prune.wrap(model, method, keep=0.3)
    with torch.no_grad():
        greedy = model.generate(**inputs, **GEN, do_sample=False)
        greedy_kept = model.prune_state.last.keep_mask
        beams = model.generate(**inputs, **GEN, num_beams=2, num_return_sequences=2, do_sample=False)
    kept = model.prune_state.last.keep_mask
    assert kept.shape[0] == 4
    assert kept[0::2].tolist() == greedy_kept.tolist() and kept[1::2].tolist() == greedy_kept.tolist()
    assert beams.shape[0] == 4 and greedy.shape[0] == 2
    # the best beam of width 1 is greedy
    with torch.no_grad():
        one = model.generate(**inputs, **GEN, num_beams=1, do_sample=False)
    assert one.tolist() == greedy.tolist()


# ---- multi-turn: a later call on the cache a pruned call produced -------------------------------


def _continue(model, inputs, first, more, **extra):
    """Generate ``first`` tokens, then ``more`` on the returned cache with the whole history."""
    out = model.generate(**inputs, max_new_tokens=first, min_new_tokens=first, do_sample=False,
                         return_dict_in_generate=True, **extra)
    history = out.sequences
    mask = torch.cat([inputs["attention_mask"], torch.ones(history.shape[0], first, dtype=torch.long)], 1)
    turn = dict(input_ids=history, attention_mask=mask, **with_cache(type(model).forward, find_cache(out)))
    for key in ("mm_token_type_ids",):  # Qwen: the history's token types (text after the prompt)
        if key in inputs:
            turn[key] = torch.cat([inputs[key], torch.zeros_like(history[:, inputs[key].shape[1]:])], 1)
    nxt = model.generate(**turn, max_new_tokens=more, min_new_tokens=more, do_sample=False)
    return nxt[:, history.shape[1] :]


@pytest.mark.parametrize("method, positions, layers, family", [
    ("random", "original", 2, "llava"), ("hiprune", "compact", 2, "llava"), ("fastv", "original", 4, "llava"),
    ("pdrop", "compact", 4, "llava"), ("hiprune", "original", 2, "llava_next")])
def test_llava_second_turn_on_the_cache_equals_one_longer_call(make_case, method, positions, layers, family):
    case = _llava(make_case, prompts=((0,), (1,)), text_layers=layers, family=family)
    keep = 0.75 if method in ("fastv", "pdrop") else 0.3
    options = {"schedule": [(2, 0.5)]} if method == "pdrop" else {}
    model = prune.wrap(case.model, method, keep=keep, positions=positions, **options)
    inputs = case.inputs()
    with torch.no_grad():
        whole = _new_tokens(model.generate(**inputs, max_new_tokens=7, min_new_tokens=7, do_sample=False), inputs)
        second = _continue(model, inputs, 3, 4)
    assert second.tolist() == whole[:, 3:].tolist()


@pytest.mark.parametrize("method", VISION)
def test_llava_chat_turn_equals_a_fresh_call_on_the_history(make_case, method):
    """A new user turn (text) on the cache gives what the whole history with its image gives afresh."""
    case = _llava(make_case)
    model = prune.wrap(case.model, method, keep=0.3)
    inputs = case.inputs()
    user = torch.tensor([[5, 9, 17, 3, 11]])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        history = torch.cat([out.sequences, user], 1)
        mask = torch.ones_like(history)
        turn = model.generate(input_ids=history, attention_mask=mask, **with_cache(type(model).forward, find_cache(out)), max_new_tokens=4,
                              min_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_logits=True)
        fresh = model.generate(input_ids=history, attention_mask=mask, pixel_values=inputs["pixel_values"],
                               max_new_tokens=4, min_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                               output_logits=True)
    assert turn.sequences[:, history.shape[1]:].tolist() == fresh.sequences[:, history.shape[1]:].tolist()
    torch.testing.assert_close(turn.logits[0], fresh.logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", VISION + ["fastv"])
def test_qwen_second_turn_on_the_cache_equals_one_longer_call(method):
    from prune._tiny import tiny_qwen_vl

    model = tiny_qwen_vl("2.5", text_layers=4) if method == "fastv" else tiny_qwen_vl("2.5")
    inputs = make_inputs([KINDS["image"], KINDS["image+video"]], [9, 6])
    prune.wrap(model, method, keep=0.75 if method == "fastv" else 0.3)
    with torch.no_grad():
        whole = _new_tokens(model.generate(**inputs, max_new_tokens=7, min_new_tokens=7, do_sample=False), inputs)
        second = _continue(model, inputs, 3, 4)
        # the M-RoPE positions of the later turn continue from rope_deltas (greedy tokens of a tiny model
        # barely depend on them: the logits do)
        whole_logits = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                                      return_dict_in_generate=True, output_logits=True).logits
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        ones = torch.ones(2, 3, dtype=torch.long)
        turn = model.generate(input_ids=out.sequences, attention_mask=torch.cat([inputs["attention_mask"], ones], 1),
                              mm_token_type_ids=torch.cat([inputs["mm_token_type_ids"], 0 * ones], 1),
                              **with_cache(type(model).forward, find_cache(out)), max_new_tokens=1, do_sample=False,
                              return_dict_in_generate=True, output_logits=True)
    assert second.tolist() == whole[:, 3:].tolist()
    torch.testing.assert_close(turn.logits[0], whole_logits[3], atol=1e-4, rtol=1e-4)


def test_new_media_on_a_pruned_cache_is_refused(make_case):
    case = _llava(make_case)
    model = prune.wrap(case.model, "random", keep=0.3)
    inputs = case.inputs()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
        history = torch.cat([out.sequences, inputs["input_ids"]], 1)  # a second image in the new turn
        with pytest.raises(ValueError, match=f"^{cache_parameter(type(model).forward)}: "):
            model.generate(input_ids=history, attention_mask=torch.ones_like(history), pixel_values=inputs["pixel_values"],
                           **with_cache(type(model).forward, find_cache(out)), max_new_tokens=2, do_sample=False)


# ---- static cache --------------------------------------------------------------------------------


@pytest.mark.parametrize("method, layers, family", [("random", 2, "llava"), ("hiprune", 2, "llava"), ("fastv", 4, "llava"),
                                                   ("hiprune", 2, "llava_next"), ("transprune", 4, "llava_next")])
def test_llava_static_cache_equals_dynamic(make_case, method, layers, family):
    case = _llava(make_case, prompts=((0,), (1,), ()), text_layers=layers, family=family)
    options = {"schedule": [(2, 0.5)]} if method == "transprune" else {}
    model = prune.wrap(case.model, method, keep=0.75 if method == "fastv" else 0.3, **options)
    inputs = case.inputs()
    with torch.no_grad():
        dynamic = model.generate(**inputs, **GEN, do_sample=False)
        static = model.generate(**inputs, **GEN, do_sample=False, cache_implementation="static")
    assert static.tolist() == dynamic.tolist()


@pytest.mark.parametrize("family, attn", [("llava", "sdpa"), ("llava", "eager"), ("qwen2_5_vl", "sdpa"),
                                         ("qwen2_5_vl", "eager")])
def test_static_decode_mask_built_directly_equals_the_models_builder(make_case, monkeypatch, family, attn):
    """Each static decode step's mask: built directly in the form of the one generate made (bool for
    SDPA, additive for eager), it equals what the model's mask builder makes of the same physical
    padding mask; where a layer has a sliding window the builder is asked instead."""
    from prune.hooks import base as B
    from prune.hooks import cutter as C

    steps = []

    def spy(*args, **kwargs):
        steps.append((args, kwargs))
        return C.map_decode_static(*args, **kwargs)

    monkeypatch.setattr(B, "map_decode_static", spy)
    if family == "llava":
        case = _llava(make_case, prompts=((0,), (1,), ()), text_layers=2, attn=attn)
        model, inputs = case.model, case.inputs()
    else:
        from prune._tiny import tiny_qwen_vl

        model = tiny_qwen_vl("2.5", attn_implementation=attn)
        inputs = make_inputs([KINDS["image"], KINDS["video"]], [9, 6])
    prune.wrap(model, "random", keep=0.3)
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, cache_implementation="static")
    assert len(steps) == 3
    direct_fn = C.static_causal_like
    made = []
    monkeypatch.setattr(C, "static_causal_like", lambda *a: made.append(direct_fn(*a)) or made[-1])
    assert all(kwargs.get("plain_causal") is True for _, kwargs in steps)  # read once, handed to each step
    for args, kwargs in steps:
        made.clear()
        direct = C.map_decode_static(*args, **{**kwargs, "plain_causal": None})["attention_mask"]  # from the config
        assert len(made) == 1 and made[0] is not None  # built directly, not by the builder
        built = C.map_decode_static(*args, **{**kwargs, "plain_causal": False})["attention_mask"]
        if family == "qwen2_5_vl":  # masks keyed by layer type
            assert set(direct) == set(built) == {"full_attention"}
            direct, built = direct["full_attention"], built["full_attention"]
        assert direct.dtype == (torch.bool if attn == "sdpa" else model.dtype)
        assert direct.shape == built.shape and torch.equal(direct, built)
    text = model.config.get_text_config()
    monkeypatch.setattr(text, "sliding_window", 4, raising=False)
    assert not C.plain_causal_text(model.config)


@pytest.mark.parametrize("method", VISION)
def test_qwen_static_cache_equals_dynamic(method):
    from prune._tiny import tiny_qwen_vl

    model = tiny_qwen_vl("2.5")
    inputs = make_inputs([KINDS["image"], KINDS["video"]], [9, 6])
    prune.wrap(model, method, keep=0.3)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **GEN, do_sample=False)
        static = model.generate(**inputs, **GEN, do_sample=False, cache_implementation="static")
    assert static.tolist() == dynamic.tolist()


@pytest.mark.parametrize("method, layers", [("random", 2), ("fastv", 4)])
def test_a_static_cache_reset_and_reused_is_a_fresh_prompt(make_case, method, layers):
    # compiled serving keeps one StaticCache and resets it per request: the plan of its last prefill is stale
    from transformers import StaticCache

    from prune._compat import cache_parameter

    case = _llava(make_case, prompts=((0,), (1,)), text_layers=layers)
    model = prune.wrap(case.model, method, keep=0.75 if method == "fastv" else 0.3)
    inputs = case.inputs()
    cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + 8)
    name = cache_parameter(model.forward)
    with torch.no_grad():
        dynamic = model.generate(**inputs, **GEN, do_sample=False)
        for _ in range(2):
            cache.reset()
            assert model.generate(**inputs, **GEN, do_sample=False, **{name: cache}).tolist() == dynamic.tolist()


# ---- copies and pickles ------------------------------------------------------------------------------


@pytest.mark.parametrize("method, layers", [("hiprune", 2), ("fastv", 4)])
def test_deepcopy_is_an_independent_wrapped_model(make_case, method, layers):
    case = _llava(make_case, text_layers=layers)
    keep = 0.75 if method == "fastv" else 0.3
    model = prune.wrap(case.model, method, keep=keep)
    inputs = case.inputs()
    with torch.no_grad():
        ref = model.generate(**inputs, **GEN, do_sample=False)
        ref_kept = model.prune_state.last.keep_mask.clone()
        twin = copy.deepcopy(model)
        assert twin.prune_state is not model.prune_state and twin.prune_state.config == model.prune_state.config
        assert twin.generate(**inputs, **GEN, do_sample=False).tolist() == ref.tolist()
        assert twin.prune_state.last.seen_by(layers - 1).tolist() == model.prune_state.last.seen_by(layers - 1).tolist()
        prune.unwrap(twin)  # removes the copy's hooks only
        assert model.generate(**inputs, **GEN, do_sample=False).tolist() == ref.tolist()
        assert model.prune_state.last.seen_by(layers - 1).tolist() == ref_kept.tolist() or method == "fastv"
        unpruned = twin(**inputs).logits
        assert unpruned.shape[1] == inputs["input_ids"].shape[1]  # the copy is plain again
        prune.unwrap(model)
        torch.testing.assert_close(model(**inputs).logits, unpruned)


def test_pickle_round_trips_to_a_wrapped_model(make_case):
    case = _llava(make_case)
    model = prune.wrap(case.model, "hiprune", keep=0.3)
    inputs = case.inputs()
    # pickled before any forward: after one, transformers 5.24's own output-capturing hooks (local
    # functions) make even an unwrapped model unpicklable
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        ref = model.generate(**inputs, **GEN, do_sample=False)
        assert loaded.prune_state.config == model.prune_state.config
        assert loaded.generate(**inputs, **GEN, do_sample=False).tolist() == ref.tolist()
        assert loaded.prune_state.last.vision_tokens_after < loaded.prune_state.last.vision_tokens_before
        prune.unwrap(loaded)
        assert loaded(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_save_pretrained_is_the_unwrapped_save(make_case, tmp_path):
    from safetensors.torch import load_file

    case = _llava(make_case)
    model = prune.wrap(case.model, "hiprune", keep=0.3)
    model.save_pretrained(tmp_path / "wrapped")
    prune.unwrap(model)
    model.save_pretrained(tmp_path / "plain")
    assert sorted(p.name for p in (tmp_path / "wrapped").iterdir()) == sorted(p.name for p in (tmp_path / "plain").iterdir())
    a, b = load_file(tmp_path / "wrapped" / "model.safetensors"), load_file(tmp_path / "plain" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "wrapped" / "config.json").read_text() == (tmp_path / "plain" / "config.json").read_text()


# ---- threads -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, layers", [("hiprune", 2), ("fastv", 4)])
def test_threads_share_one_wrapped_model(make_case, method, layers):
    case = _llava(make_case, prompts=((0,), (1,), (2,), (3,)), text_layers=layers)
    model = prune.wrap(case.model, method, keep=0.75 if method == "fastv" else 0.3)
    singles = [case.inputs([r]) for r in range(4)]
    with torch.no_grad():
        expected = [model.generate(**s, **GEN, do_sample=False).tolist() for s in singles]
    errors, results = [], {}

    def work(worker):
        try:
            with torch.no_grad():
                for i in range(6):
                    r = (worker + i) % 4
                    results[(worker, i)] = (r, model.generate(**singles[r], **GEN, do_sample=False).tolist(),
                                            model.prune_state.last.keep_mask.shape[1])
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for (_, _), (r, tokens, length) in results.items():
        assert tokens == expected[r]
        assert length == singles[r]["input_ids"].shape[1]  # this thread's own record


# ---- mixed batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("prompts", [((0,), ()), ((0,), (1, 2))])
def test_mixed_batch_is_repacked_to_the_longest_kept_row(make_case, prompts):
    case = _llava(make_case, prompts=prompts)
    model = prune.wrap(case.model, "random", keep=0.25)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("length", kwargs["inputs_embeds"].shape[1])

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    inputs = case.inputs()
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    record = model.prune_state.last
    real = record.keep_mask & ~record.padding
    assert seen["length"] == int(real.sum(1).max())
    assert seen["length"] < inputs["input_ids"].shape[1] - int(record.padding.sum(1).min())


# ---- options and re-wraps ------------------------------------------------------------------------------


@pytest.mark.parametrize("method, options, error, words", [
    ("random", {"seed": "abc"}, TypeError, "seed"),
    ("random", {"seed": 1.5}, TypeError, "seed"),
    ("hiprune", {"alpha": float("nan")}, ValueError, "alpha"),
    ("hiprune", {"alpha": -5}, ValueError, "alpha"),
    ("hiprune", {"wrap_rows": "maybe"}, TypeError, "wrap_rows"),
    ("hiprune", {"object_layer": "3"}, TypeError, "object_layer"),
    ("cls", {"variant": "both"}, ValueError, "variant"),
    ("fastv", {"ratio": 1.5}, ValueError, "ratio"),
    ("fastv", {"layer": True}, TypeError, "layer"),
])
def test_options_are_checked_at_wrap(make_case, method, options, error, words):
    case = _llava(make_case)
    with pytest.raises(error, match=words):
        prune.wrap(case.model, method, keep=0.5, **options)
    assert not hasattr(case.model, "prune_state")


def test_failed_rewrap_keeps_the_previous_wrap(make_case):
    case = _llava(make_case, text_layers=4)
    model = prune.wrap(case.model, "hiprune", keep=0.3)
    inputs = case.inputs()
    with torch.no_grad():
        ref = model.generate(**inputs, **GEN, do_sample=False)
        with pytest.raises(ValueError, match="keep"):
            prune.wrap(model, "fastv", keep=0.05)  # below fastv's floor: fails while installing
        assert model.prune_state.config.method == "hiprune"
        assert model.generate(**inputs, **GEN, do_sample=False).tolist() == ref.tolist()
        assert model.prune_state.last.vision_tokens_after < model.prune_state.last.vision_tokens_before


# ---- accelerate's dispatch hooks -----------------------------------------------------------------------


@pytest.mark.parametrize("order", ["dispatch_then_wrap", "wrap_then_dispatch"])
def test_accelerate_hooks_prune_as_the_plain_wrapped_model(make_case, order):
    """accelerate's dispatch (device_map) replaces module forwards with its hooks; on the CPU, hooks
    that align devices at every module stand in for a split over devices."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_submodules

    case = _llava(make_case, prompts=((0,), (1,)))
    inputs = case.inputs()
    model = case.model
    prune.wrap(model, "hiprune", keep=0.3)
    with torch.no_grad():
        ref = model.generate(**inputs, **GEN, do_sample=False)
        ref_kept = model.prune_state.last.keep_mask.clone()
    prune.unwrap(model)

    def dispatch():
        for module in (model.model.vision_tower, model.model.multi_modal_projector, model.model.language_model,
                       model.lm_head):
            add_hook_to_module(module, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))

    if order == "dispatch_then_wrap":
        dispatch()
        prune.wrap(model, "hiprune", keep=0.3)
    else:
        prune.wrap(model, "hiprune", keep=0.3)
        dispatch()
    assert accelerate is not None and hasattr(model.model.language_model, "_hf_hook")
    with torch.no_grad():
        out = model.generate(**inputs, **GEN, do_sample=False)
    assert out.tolist() == ref.tolist()
    assert model.prune_state.last.keep_mask.tolist() == ref_kept.tolist()
    remove_hook_from_submodules(model)
    prune.unwrap(model)


# ---- the audio-visual pool (Qwen2.5-Omni thinker) ------------------------------------------------------


def test_omni_avpool_static_cache_and_copies():
    from prune._tiny import omni_inputs, tiny_omni_thinker

    model = tiny_omni_thinker()
    inputs = omni_inputs([[("video+audio", (6, 8, 8), 0.5, 300)]], [7])
    prune.wrap(model, "avpool", keep=0.3)
    with torch.no_grad():
        greedy = model.generate(**inputs, **GEN, do_sample=False)
        kept = model.prune_state.last.keep_mask.clone()
        assert not kept.all()
        static = model.generate(**inputs, **GEN, do_sample=False, cache_implementation="static")
        assert static.tolist() == greedy.tolist()
        twin = copy.deepcopy(model)
        assert twin.generate(**inputs, **GEN, do_sample=False).tolist() == greedy.tolist()
        prune.unwrap(twin)
        assert model.generate(**inputs, **GEN, do_sample=False).tolist() == greedy.tolist()


@pytest.mark.parametrize("method", ["fastv", "pdrop", "random"])
def test_chat_turn_in_one_chunk_equals_token_by_token(make_case, method):
    """A new user turn on the cache (several tokens in one forward) gives what feeding its tokens one by
    one (plain decode steps) gives: in-LLM methods map every stage's cache for a chunk too."""
    case = _llava(make_case, text_layers=4)
    options = {"schedule": [(2, 0.5)]} if method == "pdrop" else {}
    model = prune.wrap(case.model, method, keep=0.75 if method != "random" else 0.3, **options)
    inputs = case.inputs()
    user = torch.tensor([[5, 9, 17, 3, 11]])
    first = {"max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False, "return_dict_in_generate": True}
    with torch.no_grad():
        out_a = model.generate(**inputs, **first)
        out_b = model.generate(**inputs, **first)
        history = torch.cat([out_a.sequences, user], 1)
        turn = model.generate(input_ids=history, attention_mask=torch.ones_like(history), **with_cache(type(model).forward, find_cache(out_a)),
                              max_new_tokens=1, do_sample=False, return_dict_in_generate=True, output_logits=True)
        cache = find_cache(out_b)
        fed = torch.cat([out_b.sequences[:, -1:], user], 1)  # the last answer token is not cached yet
        for i in range(fed.shape[1]):
            length = out_b.sequences.shape[1] + i
            step = model(input_ids=fed[:, i : i + 1], attention_mask=torch.ones(1, length, dtype=torch.long),
                         **with_cache(type(model).forward, cache), use_cache=True)
    torch.testing.assert_close(turn.logits[0][0], step.logits[0, -1], atol=1e-4, rtol=1e-4)


# ---- on the GPU machine ------------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
def test_device_map_split_over_cuda_and_cpu_prunes_as_one_device(make_case):
    from accelerate import dispatch_model

    case = _llava(make_case, prompts=((0,), (1,)))
    inputs = case.inputs()
    model = prune.wrap(case.model, "hiprune", keep=0.3)
    with torch.no_grad():
        ref = model.generate(**inputs, **GEN, do_sample=False, return_dict_in_generate=True, output_logits=True)
        ref_kept = model.prune_state.last.keep_mask.clone()
    prune.unwrap(model)
    device_map = {"model.vision_tower": "cpu", "model.multi_modal_projector": 0, "model.language_model": 0, "lm_head": 0}
    model = dispatch_model(model, device_map=device_map)
    prune.wrap(model, "hiprune", keep=0.3)
    with torch.no_grad():
        out = model.generate(**inputs, **GEN, do_sample=False, return_dict_in_generate=True, output_logits=True)
    assert model.prune_state.last.keep_mask.cpu().tolist() == ref_kept.tolist()
    torch.testing.assert_close(out.logits[0].cpu(), ref.logits[0], atol=1e-3, rtol=1e-3)  # cuda vs cpu fp32
    assert out.sequences.cpu().tolist() == ref.sequences.tolist()


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method, layers", [("random", 2), ("hiprune", 2), ("fastv", 4)])
def test_static_cache_on_cuda_equals_dynamic(make_case, method, layers):
    """On CUDA, transformers compiles the decode step of a static cache by itself."""
    case = _llava(make_case, prompts=((0,), (1,), ()), text_layers=layers)
    model = prune.wrap(case.model.cuda(), method, keep=0.75 if method == "fastv" else 0.3)
    inputs = {k: v.cuda() for k, v in case.inputs().items()}
    with torch.no_grad():
        dynamic = model.generate(**inputs, **GEN, do_sample=False)
        static = model.generate(**inputs, **GEN, do_sample=False, cache_implementation="static")
    assert static.tolist() == dynamic.tolist()


OLD_GENERATE = tuple(int(x) for x in __import__("transformers").__version__.split(".")[:2]) < (5, 23)


@pytest.mark.skipif(OLD_GENERATE, reason="transformers < 5.23 encodes the expanded Omni media row by row; "
                    "the joint pool then differs between copies of a prompt (known gap, see the README)")
def test_omni_avpool_beams_keep_one_set_per_prompt():
    from prune._tiny import omni_inputs, tiny_omni_thinker

    model = tiny_omni_thinker()
    inputs = omni_inputs([[("video+audio", (6, 8, 8), 0.5, 300)]], [7])
    prune.wrap(model, "avpool", keep=0.3)
    with torch.no_grad():
        model.generate(**inputs, **GEN, do_sample=False)
        kept = model.prune_state.last.keep_mask.clone()
        model.generate(**inputs, **GEN, do_sample=False, num_beams=2, num_return_sequences=2)
    beams_kept = model.prune_state.last.keep_mask
    assert beams_kept.shape[0] == 2 and all(row.tolist() == kept[0].tolist() for row in beams_kept)
