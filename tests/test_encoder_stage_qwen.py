"""Encoder-stage pruning of the packed Qwen ViTs (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): whole 2x2
merge units dropped after the cut block, the later blocks on the survivors (windows and images as
ragged segments), rotary positions kept.

The oracle is independent of the hooks: the *unwrapped* model with its vision attention replaced by a
dense masked attention over each call's whole sequence (segments from ``cu_seqlens``), in which the
blocks after the cut see only the kept rows as keys. Attention is the only operation that mixes rows,
so the kept rows of that run are what an encoder that dropped the other rows computes; the language
model then runs on the kept tokens (unwrapped, with the original M-RoPE positions)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
import transformers
from transformers import AttentionInterface

import prune
from prune._tiny import qwen3_prompts, qwen_prompts, tiny_qwen3_5, tiny_qwen3_vl, tiny_qwen_vl
from tests.oracle import qwen3_full_inputs, qwen_full_inputs, reduce_deepstack, run_reduced_mrope
from tests.test_encoder_stage import assert_unwrap_restores
from tests.test_qwen import make_inputs as qwen_inputs

GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}
KINDS = {
    "image": [("image", (1, 8, 12))],
    "2 images": [("image", (1, 8, 8)), ("image", (1, 12, 8))],
    "video": [("video", (2, 8, 8))],
    "image+video": [("image", (1, 8, 12)), ("video", (2, 12, 8))],
}
ORACLE_NAME = "test_encoder_stage_oracle_flash"  # "flash": Qwen's vision attention then passes cu_seqlens


def _build(family, attn="eager"):
    if family == "qwen3_vl":
        return tiny_qwen3_vl(attn_implementation=attn)
    if family == "qwen3_5":
        return tiny_qwen3_5(attn_implementation=attn)
    return tiny_qwen_vl("2.5" if family == "qwen2_5_vl" else "2", attn_implementation=attn)


def make_inputs(family, prompts, text_lens, seed=0):
    build = qwen3_prompts if family in ("qwen3_vl", "qwen3_5") else qwen_prompts
    return qwen_inputs(prompts, text_lens, seed=seed, build=build)


def cut_of(model):
    """HiPrune's object layer (its encoder-stage cut) on the tiny 4-block ViT."""
    return max(0, round(0.375 * len(model.model.visual.blocks)) - 1)


def kept_rows(model, inputs, record):
    """{sequence length: (S,) bool} the rows, in the encoder's order, of every kept merge unit of each
    encoder call (one per modality), from the record's kept tokens (raster order per image)."""
    out = {}
    for modality, grid_key in (("image", "image_grid_thw"), ("video", "video_grid_thw")):
        if grid_key not in inputs:
            continue
        keep = torch.cat([im.kept.cpu() for im in record.images if im.modality == modality])
        grid = inputs[grid_key]
        if hasattr(model.model.visual, "fullatt_block_indexes"):  # Qwen2.5-VL: units in window order
            from transformers.vision_utils import get_vision_window_index

            visual = model.model.visual
            index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                               window_size=visual.window_size, patch_size=visual.patch_size)
            keep = keep[torch.as_tensor(index).long()]
        rows = keep.repeat_interleave(4)
        assert rows.numel() not in out  # the calls are told apart by their lengths
        out[rows.numel()] = rows
    return out


@contextlib.contextmanager
def key_masked_vision(model, cut, rows_of):
    """The unwrapped model's vision attention as one dense masked attention per call: each query sees
    its own segment, and in the blocks after ``cut`` only the kept rows (``rows_of[S]``) as keys
    (a dropped row sees itself, so it stays finite; nothing reads it)."""
    visual = model.model.visual
    layer_of = {id(block.attn): i for i, block in enumerate(visual.blocks)}

    def attend(module, query, key, value, attention_mask, cu_seq_lens_q=None, scaling=None, **kwargs):
        n = query.shape[2]
        segment = torch.searchsorted(cu_seq_lens_q[1:].long(), torch.arange(n), right=True)
        allowed = segment[:, None] == segment[None, :]
        if layer_of[id(module)] > cut:
            kept = rows_of[n]
            allowed = (allowed & kept[None, :]) | (torch.eye(n, dtype=torch.bool) & ~kept[:, None])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=allowed, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    AttentionInterface.register(ORACLE_NAME, attend)
    config = visual.config
    before = config._attn_implementation
    config._attn_implementation = ORACLE_NAME
    try:
        yield
    finally:
        config._attn_implementation = before


def oracle(model, inputs, record, positions_keep):
    """(prefill logits, greedy tokens) of prompt 0 by the oracle (module docstring)."""
    keep = record.keep_mask[0]
    with torch.no_grad(), key_masked_vision(model, cut_of(model), kept_rows(model, inputs, record)):
        if hasattr(model.model.language_model, "_deepstack_process") or isinstance(
            model, getattr(transformers, "Qwen3_5ForConditionalGeneration", ())
        ):
            embeds, positions, visual, deepstack = qwen3_full_inputs(model, inputs)
            extra = reduce_deepstack(visual, deepstack, keep) if deepstack is not None else None
        else:
            embeds, positions = qwen_full_inputs(model, inputs)
            extra = None
    return run_reduced_mrope(model, embeds[0][keep], positions[:, 0, keep], prefill_kwargs=extra)


FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5"]


@pytest.mark.parametrize("family", FAMILIES)
def test_qwen_encoder_stage_identity_at_keep_one(family):
    model = _build(family)
    inputs = make_inputs(family, [KINDS["image+video"]], [9])
    with torch.no_grad():
        ref = model(**inputs).logits
        units = sum(int(g.prod()) // 4 for key in ("image_grid_thw", "video_grid_thw") for g in inputs[key])
        for keep in (1.0, units):  # every unit: the cut runs and keeps all rows
            prune.wrap(model, "hiprune", keep=keep, stage="encoder")
            out = model(**inputs).logits
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
            assert bool(model.prune_state.last.keep_mask.all())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_qwen_encoder_stage_oracle_prefill_and_generate(family, kind):
    model = _build(family)
    inputs = make_inputs(family, [KINDS[kind]], [11])
    wrapped = prune.wrap(model, "hiprune", keep=0.3, stage="encoder")
    with torch.no_grad():
        logits = wrapped(**inputs).logits[0]
        record = wrapped.prune_state.last
        generated = wrapped.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    assert all(im.selected == im.budget < im.tokens_before for im in record.images)
    prune.unwrap(model)
    ref_logits, ref_tokens = oracle(model, inputs, record, record.keep_mask[0])
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens


def test_qwen_encoder_stage_oracle_is_sensitive():
    """The oracle tells an encoder that dropped rows from one that did not (full rows after the cut)."""
    model = _build("qwen2_5_vl")
    inputs = make_inputs("qwen2_5_vl", [KINDS["image"]], [11])
    wrapped = prune.wrap(model, "hiprune", keep=0.3)  # post-encoder: every row through every block
    with torch.no_grad():
        logits = wrapped(**inputs).logits[0]
        record = wrapped.prune_state.last
    prune.unwrap(model)
    ref_logits, _ = oracle(model, inputs, record, record.keep_mask[0])
    assert not torch.allclose(logits, ref_logits, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_qwen_encoder_stage_selects_from_the_statistics_before_the_cut(family):
    """The kept set is the post-encoder hiprune's with its registers from the object layer."""
    model = _build(family)
    inputs = make_inputs(family, [KINDS["image+video"]], [9], seed=2)
    with torch.no_grad():
        prune.wrap(model, "hiprune", keep=0.25, deep_layer=cut_of(model))
        model(**inputs)
        ref = model.prune_state.last.keep_mask
        prune.wrap(model, "hiprune", keep=0.25, stage="encoder")
        model(**inputs)
        got = model.prune_state.last.keep_mask
    assert torch.equal(got, ref)
    assert not bool(got.all())


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_encoder_stage_batch_equals_singles(family):
    prompts = [[("image", (1, 8, 12))], [("image", (1, 12, 8)), ("video", (2, 8, 8))], [], [("video", (2, 4, 8))]]
    inputs = make_inputs(family, prompts, [5, 14, 9, 20], seed=4)
    model = prune.wrap(_build(family), "hiprune", keep=0.4, stage="encoder")
    with torch.no_grad():
        out = model.generate(**inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        batch_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]
        batch_kept = model.prune_state.last.keep_mask
        for row in range(len(prompts)):
            single = make_inputs(family, [prompts[row]], [[5, 14, 9, 20][row]], seed=4)
            single = _same_media(single, inputs, prompts, row)
            o = model.generate(**single, **GEN, return_dict_in_generate=True, output_logits=True)
            assert o.sequences[0, single["input_ids"].shape[1] :].tolist() == batch_tokens[row].tolist()
            torch.testing.assert_close(o.logits[0][0], out.logits[0][row], atol=1e-4, rtol=1e-4)
            kept = model.prune_state.last.keep_mask[0]
            assert batch_kept[row, -kept.numel() :].tolist() == kept.tolist()


def _same_media(single, inputs, prompts, row):
    """One prompt of the batch: its own ids (unpadded) and the batch's pixels of its media."""
    ids_row = inputs["input_ids"][row]
    real = inputs["attention_mask"][row].bool()
    out = {"input_ids": ids_row[real][None], "attention_mask": torch.ones(1, int(real.sum()), dtype=torch.long),
           "mm_token_type_ids": inputs["mm_token_type_ids"][row][real][None]}
    for kind, pv_key, grid_key in (("image", "pixel_values", "image_grid_thw"),
                                   ("video", "pixel_values_videos", "video_grid_thw")):
        items = [(r, g) for r, p in enumerate(prompts) for k, g in p if k == kind]
        sizes = [t * h * w for _, (t, h, w) in items]
        chosen = [i for i, (r, _) in enumerate(items) if r == row]
        if chosen:
            starts = [sum(sizes[:i]) for i in range(len(sizes))]
            out[pv_key] = torch.cat([inputs[pv_key][starts[i] : starts[i] + sizes[i]] for i in chosen])
            out[grid_key] = inputs[grid_key][chosen]
    return out


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_qwen_encoder_stage_eager_and_sdpa(family):
    results = []
    inputs = make_inputs(family, [KINDS["image+video"]], [9])
    for attn in ("eager", "sdpa"):
        model = prune.wrap(_build(family, attn), "hiprune", keep=0.25, stage="encoder")
        with torch.no_grad():
            logits = model(**inputs).logits
            tokens = model.generate(**inputs, **GEN)
        results.append((logits, model.prune_state.last.keep_mask, tokens))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][2], results[1][2])


def test_qwen_encoder_stage_with_segmented_attention():
    """The blocks after the cut take the survivors' segments (emptied windows removed) through the one-call
    segmented path too: the same logits as the model's own per-window attention."""
    inputs = make_inputs("qwen2_5_vl", [KINDS["image+video"]], [9])
    out = {}
    for choice in ("default", "segmented"):
        model = prune.wrap(_build("qwen2_5_vl", "sdpa"), "hiprune", keep=0.2, stage="encoder",
                           vision_attention=choice)
        with torch.no_grad():
            out[choice] = model(**inputs).logits
    torch.testing.assert_close(out["segmented"], out["default"], atol=1e-5, rtol=1e-5)


def test_qwen_encoder_stage_drops_whole_windows():
    """At a small keep some Qwen2.5-VL windows lose every unit: those windows leave the survivors'
    boundary list (transformers' per-segment attention fails on an empty segment), the others keep
    their survivors, and the oracle still holds."""
    model = _build("qwen2_5_vl")
    inputs = make_inputs("qwen2_5_vl", [[("image", (1, 16, 16))]], [7])
    windowed = model.model.visual.blocks[2]  # blocks 1 and 3 attend over the image, 2 inside windows
    assert 2 not in model.model.visual.fullatt_block_indexes and cut_of(model) < 2
    seen = {"original": [], "mapped": []}

    def boundaries(key):
        return lambda m, a, k: seen[key].extend(
            v.clone() for v in k.values() if isinstance(v, torch.Tensor) and v.dim() == 1 and not v.is_floating_point())

    first = windowed.register_forward_pre_hook(boundaries("original"), with_kwargs=True)  # before prune's
    wrapped = prune.wrap(model, "hiprune", keep=0.1, stage="encoder")
    last = windowed.register_forward_pre_hook(boundaries("mapped"), with_kwargs=True)  # after prune's
    with torch.no_grad():
        logits = wrapped(**inputs).logits[0]
        record = wrapped.prune_state.last
    first.remove(), last.remove()
    (original,), (cu,) = seen["original"], seen["mapped"]
    kept = record.images[0].kept.reshape(-1)  # raster units of the one image
    kept_units = int(kept.sum())
    assert int(cu[0]) == 0 and int(cu[-1]) == 4 * kept_units
    assert bool(((cu[1:] - cu[:-1]) > 0).all())  # no empty segment reaches the attention
    windows = torch.unique_consecutive(original).numel() - 1
    assert cu.numel() - 1 < windows  # some windows were emptied and removed
    prune.unwrap(model)
    ref_logits, _ = oracle(model, inputs, record, record.keep_mask[0])
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_qwen_encoder_stage_segmented_keeps_emptied_windows_on_the_device():
    """Under the one-call segmented attention the survivors' boundaries are mapped on the device, no
    read back: every window stays in the list (an emptied one as an empty segment, which the
    segmented kernel takes), and the oracle holds as with the host path."""
    model = _build("qwen2_5_vl", "sdpa")
    inputs = make_inputs("qwen2_5_vl", [[("image", (1, 16, 16))]], [7])
    windowed = model.model.visual.blocks[2]
    seen = {"original": [], "mapped": []}

    def boundaries(key):
        return lambda m, a, k: seen[key].extend(
            v.clone() for v in k.values() if isinstance(v, torch.Tensor) and v.dim() == 1 and not v.is_floating_point())

    first = windowed.register_forward_pre_hook(boundaries("original"), with_kwargs=True)
    wrapped = prune.wrap(model, "hiprune", keep=0.1, stage="encoder", vision_attention="segmented")
    last = windowed.register_forward_pre_hook(boundaries("mapped"), with_kwargs=True)
    with torch.no_grad():
        logits = wrapped(**inputs).logits[0]
        record = wrapped.prune_state.last
    first.remove(), last.remove()
    (original,), (cu,) = seen["original"], seen["mapped"]
    kept_units = int(record.images[0].kept.reshape(-1).sum())
    assert cu.shape == original.shape and int(cu[0]) == 0 and int(cu[-1]) == 4 * kept_units
    lengths = cu[1:] - cu[:-1]
    assert bool((lengths >= 0).all()) and bool((lengths == 0).any())  # emptied windows stay, empty
    prune.unwrap(model)
    ref_logits, _ = oracle(model, inputs, record, record.keep_mask[0])
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)


def test_qwen_encoder_stage_unwrap_restores():
    model = _build("qwen3_vl")
    assert_unwrap_restores(model, make_inputs("qwen3_vl", [KINDS["image+video"]], [9]))


def test_qwen_encoder_stage_refused_where_it_cannot_run():
    from prune._tiny import tiny_omni_thinker

    model = tiny_omni_thinker()
    with pytest.raises(ValueError, match="stage='encoder'"):
        prune.wrap(model, "hiprune", keep=0.25, stage="encoder")
    assert not hasattr(model, "prune_state")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_gpu_qwen_encoder_stage_equals_the_cpu_run(family):
    """On CUDA the wrap picks the segmented vision attention (FlexAttention) by default: the encoder
    stage there keeps the same units and gives the CPU run's logits (the CPU run meets the oracle)."""
    prompts = [[("image", (1, 8, 12))], [("image", (1, 12, 8)), ("video", (2, 8, 8))]]
    inputs = make_inputs(family, prompts, [5, 14], seed=4)
    out = {}
    for device in ("cpu", "cuda"):
        model = prune.wrap(_build(family, "sdpa").to(device), "hiprune", keep=0.3, stage="encoder")
        with torch.no_grad():
            logits = model(**{k: v.to(device) for k, v in inputs.items()}).logits
        out[device] = (logits.cpu(), model.prune_state.last.keep_mask.cpu())
    assert torch.equal(out["cuda"][1], out["cpu"][1])
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], atol=2e-3, rtol=2e-3)


def test_qwen2_5_unit_order_per_grid_is_the_inverse_window_index_on_every_call():
    """Qwen2.5-VL's unit order (raster unit -> encoder position) is kept per grid: asked again for a
    grid, or for other grids in between, it is still the inverse of the model's own window index."""
    from transformers.vision_utils import get_vision_window_index

    model = _build("qwen2_5_vl")
    adapter = prune.hooks.adapter_for(model)
    visual = model.model.visual
    grids = [[[1, 8, 12]], [[1, 8, 8], [1, 12, 8]], [[2, 12, 8]], [[1, 8, 12]]]
    for _ in range(2):
        for grid in grids:
            grid = torch.tensor(grid)
            index, _ = get_vision_window_index(grid, spatial_merge_size=visual.spatial_merge_size,
                                               window_size=visual.window_size, patch_size=visual.patch_size)
            order = adapter.unit_order(grid)
            assert order.tolist() == torch.argsort(torch.as_tensor(index).long()).tolist()
