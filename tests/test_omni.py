"""Qwen2.5-Omni thinker: images, audio, video and video with its audio track (TMRoPE, interleaved
2-second chunks); the avpool joint budget; view-based methods on the video part; the full model."""

import pytest
import torch

import prune
from prune._tiny import (
    OMNI_AUDIO,
    OMNI_VIDEO,
    omni_inputs,
    tiny_omni,
    tiny_omni_thinker,
)
from prune.hooks.qwen2_5_omni import AVRecord
from tests.oracle import omni_full_inputs, run_reduced_omni

GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
KINDS = {
    "image": [("image", (1, 8, 12))],
    "audio": [("audio", 300)],  # 3 s: 75 tokens, windows of 50 + 25
    "video": [("video", (4, 8, 8), 1.0)],  # 4 slices 1 s apart: windows 0, 0, 1, 1
    "video+audio": [("video+audio", (6, 8, 8), 0.5, 300)],  # 96 video + 75 audio tokens, 2 windows
}
METHODS = ["avpool", "hiprune", "random", "pool"]
# avpool on every kind; the view-based methods on the interleaved video + audio (and hiprune on an image)
ORACLE_CASES = [("avpool", kind) for kind in KINDS] + [(m, "video+audio") for m in METHODS[1:]]
ORACLE_CASES += [("hiprune", "image")]


def _pools(record):
    """(sample, pool) -> list of AVRecords of that pool."""
    pools = {}
    for im in record.images:
        if isinstance(im, AVRecord):
            pools.setdefault((im.sample, im.pool), []).append(im)
    return pools


def _kept_by_modality(record):
    out = {}
    for im in record.images:
        before, after = out.get(im.modality, (0, 0))
        out[im.modality] = (before + im.tokens_before, after + im.tokens_after)
    return out


@pytest.mark.parametrize("method", ["avpool", "hiprune"])
def test_identity_at_keep_one(method):
    model = tiny_omni_thinker()
    inputs = omni_inputs([[("image", (1, 8, 8)), ("video+audio", (4, 8, 8), 0.5, 220)]], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, method, keep=1.0)
        out = model(**inputs).logits
    assert model.prune_state.last.keep_mask.all()
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("method", "kind"), ORACLE_CASES)
def test_oracle_prefill_and_generate(method, kind):
    model = tiny_omni_thinker()
    inputs = omni_inputs([KINDS[kind]], [11])
    prune.wrap(model, method, keep=0.3)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    assert torch.equal(model.prune_state.last.keep_mask, record.keep_mask)  # generate's prefill chose the same
    assert record.positions == "original"
    keep = record.keep_mask[0]
    kept = _kept_by_modality(record)
    if method == "avpool":
        assert set(kept) == {"video+audio": {"video", "audio"}}.get(kind, {kind})
        for pool in _pools(record).values():  # one budget per pool
            n = sum(im.tokens_before for im in pool)
            assert sum(im.tokens_after for im in pool) == round(0.3 * n)
    else:
        # view-based methods prune images and videos; audio tokens are never touched
        assert "audio" not in kept
        audio = inputs["input_ids"][0] == OMNI_AUDIO
        assert keep[audio].all()
        for im in record.images:
            assert method == "pool" or im.tokens_after == round(0.3 * im.tokens_before)
    assert not keep.all()
    prune.unwrap(model)
    embeds, positions = omni_full_inputs(model, inputs)
    embeds = embeds[0]
    if method == "pool":
        for im in record.images:
            embeds[im.positions[im.kept]] = im.merged
    # kept tokens keep their original TMRoPE (t, h, w) ids
    assert torch.equal(record.position_ids[-3:, 0], positions[:, 0, keep])
    ref_logits, ref_tokens = run_reduced_omni(model, embeds[keep], positions[:, 0, keep])
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens


def test_windows_and_times_follow_tmrope():
    """Every audio/video token's recorded window and time come from its original TMRoPE t id."""
    model = tiny_omni_thinker()
    inputs = omni_inputs([[("video+audio", (6, 8, 8), 0.5, 300)], [("audio", 260)]], [7, 5])
    _, positions = omni_full_inputs(model, inputs)
    prune.wrap(model, "avpool", keep=0.25)
    with torch.no_grad():
        model(**inputs)
    record = model.prune_state.last
    pools = _pools(record)
    assert len(pools) == 2
    for pool in pools.values():
        sample = pool[0].sample
        t = torch.cat([positions[0, sample, im.positions] for im in pool])
        start = t.min()
        assert torch.equal(torch.cat([im.time for im in pool]), t - start)
        assert torch.equal(torch.cat([im.window for im in pool]), (t - start) // 50)
    # 0.5 s per temporal slice: slices 0-3 in the first 2 s, 4-5 in the next; audio 50 + 25 tokens
    video = next(im for im in record.images if im.modality == "video")
    audio = next(im for im in record.images if im.modality == "audio" and im.sample == 0)
    assert torch.bincount(video.window).tolist() == [64, 32]
    assert torch.bincount(audio.window).tolist() == [50, 25]


@pytest.mark.parametrize("keep", [0.2, 0.5, 17])
def test_joint_budget_is_one_pool(keep):
    model = tiny_omni_thinker()
    inputs = omni_inputs([[("video+audio", (6, 8, 8), 0.5, 300)]], [9])
    prune.wrap(model, "avpool", keep=keep)
    with torch.no_grad():
        model(**inputs)
    (pool,) = _pools(model.prune_state.last).values()
    n = sum(im.tokens_before for im in pool)
    expected = round(keep * n) if isinstance(keep, float) else keep
    assert n == 96 + 75
    assert sum(im.tokens_after for im in pool) == expected == pool[0].pool_budget


def _silence(model, modality):
    """Make every projected token of one modality identical (no distinct content)."""
    mm = model.model if hasattr(model.model, "language_model") else model
    layer = mm.audio_tower.proj if modality == "audio" else mm.visual.merger.mlp[2]
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.copy_(torch.randn(layer.bias.shape, generator=torch.Generator().manual_seed(5)))


def _fractions(model, inputs):
    with torch.no_grad():
        model(**inputs)
    kept = _kept_by_modality(model.prune_state.last)
    return {m: after / before for m, (before, after) in kept.items()}, kept


@pytest.mark.parametrize("flat", ["audio", "video"])
def test_salient_modality_takes_the_budget(flat):
    """One modality's tokens all identical (e.g. silence, a static blank scene), the other's distinct:
    the joint pool moves the budget to the salient one (above keep for it, below keep for the flat
    one, whichever it is); per_modality keeps keep x each regardless."""
    salient = {"audio": "video", "video": "audio"}[flat]
    inputs = omni_inputs([[("video+audio", (6, 8, 8), 0.5, 300)]], [9])
    model = tiny_omni_thinker()
    _silence(model, flat)
    prune.wrap(model, "avpool", keep=0.2)
    joint, kept = _fractions(model, inputs)
    assert sum(after for _, after in kept.values()) == round(0.2 * (96 + 75))
    assert joint[salient] > 0.2 > joint[flat] and joint[salient] - joint[flat] > 0.15
    prune.wrap(model, "avpool", keep=0.2, budget="per_modality")
    _, kept = _fractions(model, inputs)
    assert kept == {"video": (96, round(0.2 * 96)), "audio": (75, round(0.2 * 75))}
    # per-modality rank normalisation makes every modality's scores uniform: the split cannot move
    prune.wrap(model, "avpool", keep=0.2, normalize="rank")
    ranked, _ = _fractions(model, inputs)
    assert abs(ranked["video"] - ranked["audio"]) < 0.05


@pytest.mark.parametrize("floor", [0, 1, 3])
def test_window_floor(floor):
    inputs = omni_inputs([[("video+audio", (6, 8, 8), 0.5, 300)]], [9])
    model = tiny_omni_thinker()
    _silence(model, "audio")  # audio would lose everything without a floor
    prune.wrap(model, "avpool", keep=0.1, window_floor=floor)
    with torch.no_grad():
        model(**inputs)
    record = model.prune_state.last
    (pool,) = _pools(record).values()
    assert sum(im.tokens_after for im in pool) == round(0.1 * 171)
    groups = [(im.modality, w, int(im.kept[im.window == w].sum()), int((im.window == w).sum()))
              for im in pool for w in im.window.unique().tolist()]
    assert len(groups) == 4
    if floor == 0:
        assert sum(k for m, _, k, _ in groups if m == "audio") == 0
    for _, _, kept, size in groups:
        assert kept >= min(floor, size)


@pytest.mark.parametrize("keep", [0.1, 0.3, 0.77])
def test_per_modality_keeps_keep_of_each(keep):
    model = tiny_omni_thinker()
    inputs = omni_inputs([[("video+audio", (6, 8, 8), 0.5, 300)], [("audio", 250)]], [9, 6])
    prune.wrap(model, "avpool", keep=keep, budget="per_modality")
    with torch.no_grad():
        model(**inputs)
    for im in model.prune_state.last.images:
        assert im.tokens_after == round(keep * im.tokens_before) == im.budget
        for w in im.window.unique():  # the floor also holds per window inside a modality
            assert im.kept[im.window == w].sum() >= 1


def select_rows(prompts, inputs, rows):
    """The inputs of some prompts of an ``omni_inputs`` batch (all-padding columns dropped)."""
    out = {k: inputs[k][rows] for k in ("input_ids", "attention_mask")}
    first = int(out["attention_mask"].argmax(1).min())
    out = {k: v[:, first:] for k, v in out.items()}
    out["use_audio_in_video"] = inputs["use_audio_in_video"]
    flat = [(r, item) for r, items in enumerate(prompts) for item in items]
    images = [(r, it) for r, it in flat if it[0] == "image"]
    videos = [(r, it) for r, it in flat if it[0] in ("video", "video+audio")]
    audios = [(r, it) for r, it in flat if it[0] in ("audio", "video+audio")]
    if images:
        sizes = [t * h * w for _, (_, (t, h, w)) in images]
        chosen = [i for i, (r, _) in enumerate(images) if r in rows]
        if chosen:
            out["pixel_values"] = torch.cat(
                [inputs["pixel_values"][sum(sizes[:i]) : sum(sizes[: i + 1])] for i in chosen])
            out["image_grid_thw"] = inputs["image_grid_thw"][chosen]
    if videos:
        sizes = [t * h * w for _, it in videos for t, h, w in [it[1]]]
        chosen = [i for i, (r, _) in enumerate(videos) if r in rows]
        if chosen:
            out["pixel_values_videos"] = torch.cat(
                [inputs["pixel_values_videos"][sum(sizes[:i]) : sum(sizes[: i + 1])] for i in chosen])
            out["video_grid_thw"] = inputs["video_grid_thw"][chosen]
            out["video_second_per_grid"] = inputs["video_second_per_grid"][chosen]
    if audios:
        chosen = [i for i, (r, _) in enumerate(audios) if r in rows]
        if chosen:
            out["input_features"] = inputs["input_features"][chosen]
            out["feature_attention_mask"] = inputs["feature_attention_mask"][chosen]
    return out


BATCHES = {
    "with audio track": [
        [("image", (1, 8, 12))],
        [("video+audio", (6, 8, 8), 0.5, 300)],
        [],
        [("audio", 180), ("image", (1, 8, 8)), ("video+audio", (2, 8, 12), 1.0, 150)],
    ],
    "separate streams": [
        [("video", (4, 8, 8), 1.0)],
        [("audio", 240), ("video", (2, 8, 12), 0.5)],
        [("image", (1, 12, 8))],
    ],
}


@pytest.mark.parametrize(("method", "batch"), [("avpool", "with audio track"), ("avpool", "separate streams"),
                                               ("hiprune", "with audio track")])
def test_batch_equals_singles(method, batch):
    prompts = BATCHES[batch]
    inputs = omni_inputs(prompts, [5 + 3 * i for i in range(len(prompts))], seed=4)
    model = prune.wrap(tiny_omni_thinker(), method, keep=0.3)
    with torch.no_grad():
        out = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        batch_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        batch_kept = model.prune_state.last.keep_mask
        for row in range(len(prompts)):
            single = select_rows(prompts, inputs, [row])
            o = model.generate(**single, **GEN, return_dict_in_generate=True, output_logits=True)
            assert o.sequences[0, single["input_ids"].shape[1] :].tolist() == batch_tokens[row].tolist()
            torch.testing.assert_close(o.logits[0][0], out.logits[0][row], atol=1e-4, rtol=1e-4)
            kept = model.prune_state.last.keep_mask[0]
            assert batch_kept[row, -kept.numel() :].tolist() == kept.tolist()


def test_eager_and_sdpa_agree():
    inputs = omni_inputs([[("image", (1, 8, 8)), ("video+audio", (4, 8, 8), 0.5, 220)]], [9])
    results = {}
    for attn in ("eager", "sdpa"):
        model = prune.wrap(tiny_omni_thinker(attn_implementation=attn), "avpool", keep=0.3)
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
        results[attn] = (model.prune_state.last.keep_mask, logits, tokens)
    assert torch.equal(results["eager"][0], results["sdpa"][0])
    torch.testing.assert_close(results["eager"][1], results["sdpa"][1], atol=1e-4, rtol=1e-4)
    assert torch.equal(results["eager"][2], results["sdpa"][2])


def test_prompt_weight_uses_the_instruction():
    model = tiny_omni_thinker()
    inputs = omni_inputs([[("video+audio", (6, 8, 8), 0.5, 300)]], [12])
    kept = {}
    for weight in (0.0, 1.0):
        prune.wrap(model, "avpool", keep=0.2, prompt_weight=weight)
        with torch.no_grad():
            model(**inputs)
        kept[weight] = model.prune_state.last.keep_mask.clone()
        assert int((kept[weight] == 0).sum()) == 171 - round(0.2 * 171)
    assert not torch.equal(kept[0.0], kept[1.0])
    # the instruction is what the prompt term reads: other words, other choice
    other = dict(inputs, input_ids=inputs["input_ids"].clone())
    tail = other["input_ids"][0, -6:]
    other["input_ids"][0, -6:] = (tail + 37) % 140 + 3
    with torch.no_grad():
        model(**other)
    assert not torch.equal(model.prune_state.last.keep_mask, kept[1.0])


def test_full_model_wraps_thinker_and_refuses_speech():
    full = tiny_omni(talker=True)
    inputs = omni_inputs([[("video+audio", (4, 8, 8), 0.5, 220)]], [9])
    gen = {"generation_mode": "text", "thinker_max_new_tokens": 8, "thinker_min_new_tokens": 8,
           "thinker_do_sample": False}
    with torch.no_grad():
        ref = full.generate(**inputs, **gen)
        prune.wrap(full, "avpool", keep=0.2)
        out = full.generate(**inputs, **gen)
        record = full.prune_state.last
        assert int(record.keep_mask.sum()) < inputs["input_ids"].shape[1]
        # the same as wrapping the thinker alone
        prune.unwrap(full)
        prune.wrap(full.thinker, "avpool", keep=0.2)
        alone = full.thinker.generate(**inputs, **GEN)
        assert torch.equal(out, alone) and out.shape == ref.shape
        prune.unwrap(full.thinker)
        prune.wrap(full, "avpool", keep=0.2)
        with pytest.raises(ValueError, match="generation_mode.*talker"):
            full.generate(**inputs)
        prune.unwrap(full)
        assert "generate" not in full.__dict__
        assert torch.equal(full.generate(**inputs, **gen), ref)


def test_unwrap_restores():
    model = tiny_omni_thinker()
    inputs = omni_inputs([[("image", (1, 8, 8)), ("video+audio", (4, 8, 8), 0.5, 220)]], [9])
    mm = model.model if hasattr(model.model, "language_model") else model
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, "avpool", keep=0.3)
        model(**inputs)
        prune.wrap(model, "hiprune", keep=0.3)  # re-wrapping replaces
        model(**inputs)
        prune.unwrap(model)
        out = model(**inputs).logits
    names = ("get_image_features", "get_video_features", "get_audio_features")
    assert not any(k in mm.__dict__ for k in names)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_bad_input():
    model = tiny_omni_thinker()
    with pytest.raises(ValueError, match="needs a \\[CLS\\] token.*hiprune"):
        prune.wrap(model, "cls", keep=0.3)
    with pytest.raises(ValueError, match="positions='compact' is not supported"):
        prune.wrap(model, "avpool", keep=0.3, positions="compact")
    bad = [("budget", "even"), ("window_floor", -1), ("temperature", 0), ("prompt_weight", 2.0),
           ("normalize", "zscore")]
    for option, value in bad:
        with pytest.raises(ValueError, match=f"avpool (option )?{option}"):
            prune.wrap(model, "avpool", keep=0.3, **{option: value})
    with pytest.raises(TypeError, match="unknown option"):
        prune.wrap(model, "avpool", keep=0.3, floor=1)
    with pytest.raises(ValueError, match="keep"):
        prune.wrap(model, "avpool", keep=1.5)
    assert not hasattr(model, "prune_state")
    # a prompt without media is a pass-through
    prune.wrap(model, "avpool", keep=0.3)
    inputs = omni_inputs([[]], [9])
    with torch.no_grad():
        model(**inputs)
    assert model.prune_state.last.keep_mask.all() and not model.prune_state.last.images


def test_video_tokens_interleave_as_the_model_expects():
    """The hand-built layout is the one get_rope_index reads: audio and video ids rise together."""
    model = tiny_omni_thinker()
    inputs = omni_inputs([KINDS["video+audio"]], [5])
    _, positions = omni_full_inputs(model, inputs)
    ids = inputs["input_ids"][0]
    t = positions[0, 0]
    video, audio = t[ids == OMNI_VIDEO], t[ids == OMNI_AUDIO]
    assert video.min() == audio.min()  # both streams start at the same time
    assert video.max() - video.min() == 62 and audio.max() - audio.min() == 74  # 2.5 s, 2.96 s


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["avpool", "hiprune"])
def test_cuda_oracle(method):
    """On the GPU (Triton statistics): the same oracle equivalence, and the same keep-set as on CPU."""
    inputs = omni_inputs([[("image", (1, 8, 8)), ("video+audio", (6, 8, 8), 0.5, 300)]], [11])
    cpu = prune.wrap(tiny_omni_thinker(attn_implementation="sdpa"), method, keep=0.3)
    with torch.no_grad():
        cpu(**inputs)
    model = prune.wrap(tiny_omni_thinker(attn_implementation="sdpa").cuda(), method, keep=0.3)
    cuda_inputs = {k: v.cuda() if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad():
        logits = model(**cuda_inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**cuda_inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    keep = record.keep_mask[0]
    assert torch.equal(keep.cpu(), cpu.prune_state.last.keep_mask[0])
    prune.unwrap(model)
    embeds, positions = omni_full_inputs(model, cuda_inputs)
    ref_logits, ref_tokens = run_reduced_omni(model, embeds[0][keep], positions[:, 0, keep])
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert generated == ref_tokens
