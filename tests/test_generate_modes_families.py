"""Every generate mode (DESIGN.md) on the families of issue 16: Qwen3-VL, Qwen3.5, InternVL, Gemma 3
and LLaVA-NeXT-Video.
Beam search and num_return_sequences, sampling, a later turn on the cache, static cache, copies,
pickles, threads and mixed batches behave as on the unwrapped model (tests/test_generate_modes.py
covers LLaVA, LLaVA-NeXT, Qwen2.5-VL and the Omni thinker the same way)."""

import copy
import io
import threading

import pytest
import torch
import transformers

import prune
from prune._compat import find_cache, with_cache

GEN = {"max_new_tokens": 5, "min_new_tokens": 5}
FAMILIES = [
    name
    for name, cls in (
        ("qwen3_vl", "Qwen3VLForConditionalGeneration"),
        ("qwen3_5", "Qwen3_5ForConditionalGeneration"),
        ("internvl", "InternVLForConditionalGeneration"),
        ("gemma3", "Gemma3ForConditionalGeneration"),
        ("llava_next_video", "LlavaNextVideoForConditionalGeneration"),
    )
    if hasattr(transformers, cls)  # a family whose classes are missing is simply absent
]
IN_LLM = [f for f in FAMILIES if f in ("qwen3_vl", "internvl", "llava_next_video")]  # Qwen3.5 and Gemma 3 refuse in-LLM methods
QWEN_PROMPTS = [  # an image, two images, text only, a video (timestamps between its slices)
    [("image", (1, 8, 12))],
    [("image", (1, 8, 8)), ("image", (1, 12, 8))],
    [],
    [("video", (2, 8, 8))],
]
TEXT_LENS = [9, 6, 12, 7]
# transformers < 5.23 runs the encoder inside the expanded forward on media it repeated per row
# (repeat_interleave of tiles / images): the copies of an InternVL prompt with several tiles or a
# Gemma 3 prompt with several images then see different pixels, unwrapped as well (known gap, README)
OLD_GENERATE = tuple(int(x) for x in transformers.__version__.split(".")[:2]) < (5, 23)


def _skip_expanded_media(family, method):
    # (LLaVA-NeXT-Video's repeated anyres images no longer match the prompts' placeholders: prune refuses)
    if OLD_GENERATE and family in ("internvl", "gemma3", "llava_next_video") and (
            method not in ("random", "fastv") or family == "llava_next_video"):
        pytest.skip(f"transformers {transformers.__version__} expands {family}'s media per row before encoding")


def _one_prompt(family):
    """The two-image prompt, or where old releases expand several images wrongly the one-image prompt."""
    return [0] if OLD_GENERATE and family in ("internvl", "gemma3", "llava_next_video") else [1]


class FamilyCase:
    """A tiny model of ``family`` and a batch of four prompts: one image, two images, text only, and
    a video (Qwen, LLaVA-NeXT-Video) or a one-image prompt (InternVL: an image of 2 tiles; Gemma 3:
    one more image)."""

    def __init__(self, family, text_layers=2, seed=4):
        from prune import _tiny

        self.family = family
        if family in ("qwen3_vl", "qwen3_5"):
            from tests.test_qwen3_vl import make_inputs

            build = _tiny.tiny_qwen3_vl if family == "qwen3_vl" else _tiny.tiny_qwen3_5
            self.model = build(text_layers=max(text_layers, 2 if family == "qwen3_vl" else 4))
            self.batch = make_inputs(QWEN_PROMPTS, TEXT_LENS, seed=seed)
        elif family == "internvl":
            self.tiles = [[1], [3, 1], [], [2]]
            self.model = _tiny.tiny_internvl(text_layers=text_layers)
            self.batch = _tiny.internvl_inputs(self.tiles, TEXT_LENS, seed=seed)
        elif family == "llava_next_video":
            from tests.test_llava_next_video import KINDS

            self.prompts = [KINDS["image"], KINDS["2 images"], [], KINDS["video"]]
            self.model = _tiny.tiny_llava_next_video(text_layers=text_layers)
            # placeholder counts from a twin: a forward leaves transformers' unpicklable hooks on a model
            twin = _tiny.tiny_llava_next_video(text_layers=1)
            self.batch = _tiny.next_video_inputs(twin, self.prompts, TEXT_LENS, seed=seed)
        else:
            self.images = [1, 2, 0, 1]
            self.model = _tiny.tiny_gemma3(text_layers=max(text_layers, 2))
            self.batch = _tiny.gemma3_inputs(self.images, TEXT_LENS, seed=seed)

    def inputs(self, rows=None):
        if rows is None:
            return dict(self.batch)
        if self.family in ("qwen3_vl", "qwen3_5"):
            from tests.test_qwen import select_rows

            return select_rows(QWEN_PROMPTS, self.batch, rows)
        if self.family == "llava_next_video":
            from tests.test_llava_next_video import select_rows

            return select_rows(self.prompts, self.batch, rows)
        if self.family == "internvl":
            from tests.test_internvl import select_rows

            return select_rows(self.batch, self.tiles, rows)
        from tests.test_gemma3 import select_rows

        return select_rows(self.batch, self.images, rows)

    def media(self, inputs):
        """The media arguments of ``inputs`` (a fresh call on a history passes them again)."""
        keys = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_values_videos", "video_grid_thw")
        return {k: inputs[k] for k in keys if k in inputs}

    def history(self, inputs, tokens):
        """Arguments of a call on ``inputs``' prompt followed by ``tokens`` (B, T) of text."""
        ids = torch.cat([inputs["input_ids"], tokens], 1)
        out = {"input_ids": ids, "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(tokens)], 1)}
        for key in ("mm_token_type_ids", "token_type_ids"):  # the history's token types: text after the prompt
            if key in inputs:
                out[key] = torch.cat([inputs[key], torch.zeros_like(tokens)], 1)
        return out


def _new(out, inputs):
    seq = out.sequences if hasattr(out, "sequences") else out
    return seq[:, inputs["input_ids"].shape[1] :]


def _keep(method):
    return 0.75 if method == "fastv" else 0.3


def _cases(methods=("random", "hiprune"), llm=("fastv",)):
    return [(f, m) for f in FAMILIES for m in methods] + [(f, m) for f in IN_LLM for m in llm]


# ---- beam search, num_return_sequences, sampling ------------------------------------------------


@pytest.mark.parametrize("family, method", _cases())
def test_beams_keep_one_set_per_prompt_and_batch_equals_singles(family, method):
    _skip_expanded_media(family, method)
    case = FamilyCase(family, text_layers=4)
    model = prune.wrap(case.model, method, keep=_keep(method))
    inputs = case.inputs([0, 1])
    beams = {"num_beams": 2, "num_return_sequences": 2, "do_sample": False}
    with torch.no_grad():
        greedy = model.generate(**inputs, **GEN, do_sample=False)
        greedy_kept = model.prune_state.last.keep_mask.clone()
        out = model.generate(**inputs, **GEN, **beams)
        kept = model.prune_state.last.keep_mask
        assert kept.shape[0] == 4  # every copy of a prompt gets the prompt's kept set
        assert kept[0::2].tolist() == greedy_kept.tolist() and kept[1::2].tolist() == greedy_kept.tolist()
        for row in range(2):
            single = case.inputs([row])
            alone = model.generate(**single, **GEN, **beams)
            assert _new(alone, single).tolist() == _new(out, inputs)[2 * row : 2 * row + 2].tolist()
        one = model.generate(**inputs, **GEN, num_beams=1, do_sample=False)  # width 1 is greedy
    assert one.tolist() == greedy.tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_with_return_sequences_keeps_one_set_per_prompt(family):
    case = FamilyCase(family)
    inputs = case.inputs(_one_prompt(family))
    sample = {"do_sample": True, "num_return_sequences": 2, "top_k": 5}
    with torch.no_grad():
        torch.manual_seed(0)
        plain = case.model.generate(**inputs, **GEN, **sample)
        model = prune.wrap(case.model, "hiprune", keep=1.0)
        torch.manual_seed(0)
        identity = model.generate(**inputs, **GEN, **sample)
        assert identity.tolist() == plain.tolist()  # keep=1 samples what the unwrapped model samples
        prune.wrap(model, "hiprune", keep=0.3)
        torch.manual_seed(0)
        model_out = model.generate(**inputs, **GEN, **sample)
        kept = model.prune_state.last.keep_mask
        torch.manual_seed(0)
        again = model.generate(**inputs, **GEN, **sample)
    assert kept.shape[0] == 2 and kept[0].tolist() == kept[1].tolist() and not kept[0].all()
    assert again.tolist() == model_out.tolist()


@pytest.mark.parametrize("family, mode", [(f, m) for f in FAMILIES if f in ("internvl", "llava_next_video")
                                          for m in ("beams", "sample2")])
def test_expanded_generate_equals_the_language_model_on_the_reduced_embeds(family, mode):
    """1-D positions (compact): the oracle is the unwrapped model's own generate with the same decoding
    arguments on the reduced inputs_embeds. (Gemma 3's generate takes no inputs_embeds; Qwen's
    M-RoPE positions are not those of an inputs_embeds call: their oracles are in their own files.)"""
    case = FamilyCase(family)
    inputs = case.inputs(_one_prompt(family))
    args = {"num_beams": 2, "num_return_sequences": 2, "do_sample": False} if mode == "beams" else \
        {"do_sample": True, "num_return_sequences": 2, "top_k": 5}
    model = prune.wrap(case.model, "hiprune", keep=0.3, positions="compact")
    with torch.no_grad():
        torch.manual_seed(0)
        out = model.generate(**inputs, **GEN, **args)
        kept = model.prune_state.last.keep_mask[0]
        prune.unwrap(model)
        seen = {}

        def grab(module, a, kw):
            seen.setdefault("embeds", kw["inputs_embeds"].clone())

        handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
        model(**inputs)
        handle.remove()
        reduced = {"inputs_embeds": seen["embeds"][:, kept],
                   "attention_mask": torch.ones(1, int(kept.sum()), dtype=torch.long)}
        torch.manual_seed(0)
        ref = model.generate(**reduced, **GEN, **args)
    assert _new(out, inputs).tolist() == ref.tolist()


# ---- a later turn on the cache ------------------------------------------------------------------------


@pytest.mark.parametrize("family, method", _cases())
def test_second_turn_on_the_cache_equals_one_longer_call(family, method):
    case = FamilyCase(family, text_layers=4)
    model = prune.wrap(case.model, method, keep=_keep(method))
    inputs = case.inputs([0, 1, 2])
    logits = {"return_dict_in_generate": True, "output_logits": True}
    with torch.no_grad():
        whole = model.generate(**inputs, max_new_tokens=7, min_new_tokens=7, do_sample=False, **logits)
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
        turn = case.history(inputs, _new(out, inputs))
        nxt = model.generate(**turn, **with_cache(type(model).forward, find_cache(out)), max_new_tokens=4, min_new_tokens=4,
                             do_sample=False, **logits)
    assert _new(nxt, turn).tolist() == _new(whole, inputs)[:, 3:].tolist()
    for step in range(4):  # logits too: tiny models' greedy tokens barely depend on M-RoPE positions
        torch.testing.assert_close(nxt.logits[step], whole.logits[3 + step], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family, method", _cases(llm=()))
def test_chat_turn_equals_a_fresh_call_on_the_history(family, method):
    """A new user turn (text) on the cache gives what the whole history with its media gives afresh."""
    case = FamilyCase(family)
    model = prune.wrap(case.model, method, keep=0.3)
    inputs = case.inputs([1])
    user = torch.tensor([[5, 9, 17, 3, 11]])
    gen = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "return_dict_in_generate": True,
           "output_logits": True}
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                             return_dict_in_generate=True)
        history = case.history(inputs, torch.cat([_new(out, inputs), user], 1))
        turn = model.generate(**history, **with_cache(type(model).forward, find_cache(out)), **gen)
        fresh = model.generate(**history, **case.media(inputs), **gen)
    assert _new(turn, history).tolist() == _new(fresh, history).tolist()
    torch.testing.assert_close(turn.logits[0], fresh.logits[0], atol=1e-4, rtol=1e-4)


# ---- static cache --------------------------------------------------------------------------------------


def _static_cache_unsupported(case, inputs):
    """The reason transformers itself cannot decode this family with a static cache, or None."""
    try:
        with torch.no_grad():
            case.model.generate(**inputs, max_new_tokens=2, do_sample=False, cache_implementation="static")
    except Exception as exc:  # noqa: BLE001 - the unwrapped model's own limitation, reported as the skip reason
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.mark.parametrize("family, method", _cases())
def test_static_cache_equals_dynamic(family, method):
    case = FamilyCase(family, text_layers=4)
    inputs = case.inputs([0, 1, 2])
    reason = _static_cache_unsupported(case, inputs)
    if reason:
        pytest.skip(f"the unwrapped {family} model has no static-cache generate here ({reason[:120]})")
    model = prune.wrap(case.model, method, keep=_keep(method))
    with torch.no_grad():
        dynamic = model.generate(**inputs, **GEN, do_sample=False)
        static = model.generate(**inputs, **GEN, do_sample=False, cache_implementation="static")
    assert static.tolist() == dynamic.tolist()


# ---- copies, pickles, threads ----------------------------------------------------------------------------


@pytest.mark.parametrize("family, method", _cases(methods=("hiprune",)))
def test_deepcopy_is_an_independent_wrapped_model(family, method):
    case = FamilyCase(family, text_layers=4)
    model = prune.wrap(case.model, method, keep=_keep(method))
    inputs = case.inputs([1])
    with torch.no_grad():
        ref = model.generate(**inputs, **GEN, do_sample=False)
        ref_kept = model.prune_state.last.keep_mask.clone()
        twin = copy.deepcopy(model)
        assert twin.prune_state is not model.prune_state and twin.prune_state.config == model.prune_state.config
        assert twin.generate(**inputs, **GEN, do_sample=False).tolist() == ref.tolist()
        assert twin.prune_state.last.keep_mask.tolist() == ref_kept.tolist()
        prune.unwrap(twin)  # removes the copy's hooks only
        assert model.generate(**inputs, **GEN, do_sample=False).tolist() == ref.tolist()
        assert twin(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]  # the copy is plain again
        unpruned = twin(**inputs).logits
        prune.unwrap(model)
        torch.testing.assert_close(model(**inputs).logits, unpruned)


@pytest.mark.parametrize("family", FAMILIES)
def test_pickle_round_trips_to_a_wrapped_model(family):
    case = FamilyCase(family)
    model = prune.wrap(case.model, "hiprune", keep=0.3)
    inputs = case.inputs([1])
    buffer = io.BytesIO()  # before any forward (see tests/test_generate_modes.py)
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


@pytest.mark.parametrize("family, method", _cases(methods=("hiprune",)))
def test_threads_share_one_wrapped_model(family, method):
    case = FamilyCase(family, text_layers=4)
    model = prune.wrap(case.model, method, keep=_keep(method))
    singles = [case.inputs([r]) for r in range(4)]
    with torch.no_grad():
        expected = [model.generate(**s, **GEN, do_sample=False).tolist() for s in singles]
    errors, results = [], {}

    def work(worker):
        try:
            with torch.no_grad():
                for i in range(4):
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
    for r, tokens, length in results.values():
        assert tokens == expected[r]
        assert length == singles[r]["input_ids"].shape[1]  # this thread's own record


# ---- mixed batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [[0, 2], [1, 2, 3]])
@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_batch_is_repacked_to_the_longest_kept_row(family, rows):
    """Prompts with media and without: the language model sees the longest row's kept length, padding
    is never counted as kept, and each row's kept count is its text plus its budgets."""
    case = FamilyCase(family)
    model = prune.wrap(case.model, "random", keep=0.25)
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("length", kwargs["inputs_embeds"].shape[1])

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    inputs = case.inputs(rows)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    record = model.prune_state.last
    real = record.keep_mask & ~record.padding
    assert seen["length"] == int(real.sum(1).max())
    assert seen["length"] < inputs["input_ids"].shape[1] - int(record.padding.sum(1).min())
    assert record.vision_tokens_after == sum(im.tokens_after for im in record.images)
    text = int(inputs["attention_mask"].sum()) - record.vision_tokens_before
    assert int(real.sum()) == text + record.vision_tokens_after
