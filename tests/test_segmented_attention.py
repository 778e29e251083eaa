"""Segmented vision attention (``vision_attention="segmented"``): the kernel against its reference,
the seam into transformers' Qwen vision attention (one call per layer with cu_seqlens), identity of
wrapped models, statistics unchanged under the tap, exact unwrap, and errors naming the argument.

Tolerances: fp32 on CPU. Kernel (eager FlexAttention vs per-segment SDPA): 1e-5. Encoders (eager vs
SDPA vs segmented): 1e-5; an SDPA-loaded model with the segmented reference is bit-identical (the
reference runs the same SDPA calls per segment), so statistics and kept tokens are equal exactly there.
"""

from __future__ import annotations

import copy
import importlib
import pickle

import pytest
import torch
import transformers
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import prune
from prune._tiny import qwen3_prompts, qwen_media, qwen_prompts, tiny_llava, tiny_qwen3_vl, tiny_qwen_vl
from prune.hooks import adapter_for
from prune.hooks import vision_attention as VA  # noqa: N812
from prune.hooks.attention_tap import TAP_FLASH_NAME, TAP_NAME
from prune.kernels.segmented_attention import (
    segment_block_mask,
    segmented_attention,
    segmented_attention_dense,
    segmented_attention_flex,
    segmented_attention_reference,
)

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
HAS_QWEN3 = hasattr(transformers, "Qwen3VLForConditionalGeneration")
MEDIA = [("image", (1, 8, 12)), ("video", (2, 8, 8))]


def _cu(lengths, device="cpu"):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


# ---- kernel -------------------------------------------------------------------------------------
SHAPES = [
    # (batch, heads, kv heads, segment lengths, head dim)
    (1, 4, 4, [100, 150, 50], 16),
    (2, 4, 2, [5, 0, 300, 1, 64], 8),  # GQA, an empty segment, a 1-token segment
    (1, 2, 2, [128, 128, 256], 32),  # segments on block boundaries (full blocks)
    (1, 3, 1, [7], 80),  # one segment shorter than a block, head dim 80 (the Qwen ViTs')
    (1, 2, 2, [64] * 9 + [36, 200], 16),  # windows as Qwen2.5-VL makes them, then a long tail
]


@pytest.mark.parametrize("batch,heads,kv_heads,lengths,dim", SHAPES)
def test_flex_equals_reference(batch, heads, kv_heads, lengths, dim):
    n = sum(lengths)
    gen = torch.Generator().manual_seed(n)
    q = torch.randn(batch, heads, n, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, n, dim, generator=gen) for _ in range(2))
    cu = _cu(lengths)
    ref = segmented_attention_reference(q, k, v, cu, scale=0.3)
    out = segmented_attention_flex(q, k, v, cu, scale=0.3, compiled=False)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(segmented_attention(q, k, v, cu, scale=0.3), ref, atol=0, rtol=0)  # CPU: the reference


@pytest.mark.parametrize("batch,heads,kv_heads,lengths,dim", SHAPES)
def test_dense_equals_reference(batch, heads, kv_heads, lengths, dim):
    n = sum(lengths)
    gen = torch.Generator().manual_seed(n + 1)
    q = torch.randn(batch, heads, n, dim, generator=gen)
    k, v = (torch.randn(batch, kv_heads, n, dim, generator=gen) for _ in range(2))
    out = segmented_attention_dense(q, k, v, _cu(lengths), scale=0.3)
    torch.testing.assert_close(out, segmented_attention_reference(q, k, v, _cu(lengths), scale=0.3), atol=1e-5, rtol=0)


def test_reference_is_per_segment_softmax():
    """The reference's semantics from first principles: a query attends to its own segment only."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 4, generator=gen) for _ in range(3))
    cu = _cu([3, 0, 7])
    seg = torch.tensor([0] * 3 + [1] * 7)
    logits = (q @ k.transpose(-1, -2)) * 4**-0.5
    logits = logits.masked_fill(seg[:, None] != seg[None, :], float("-inf"))
    torch.testing.assert_close(segmented_attention_reference(q, k, v, cu), logits.softmax(-1) @ v, atol=1e-6, rtol=0)


@pytest.mark.parametrize("lengths", [[100, 150, 50], [128, 128, 256], [5, 0, 300, 1, 64], [7], [1000, 24, 3, 200]])
def test_block_mask_equals_dense_construction(lengths):
    from torch.nn.attention.flex_attention import create_block_mask

    n = sum(lengths)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    dense = create_block_mask(lambda b, h, q, kv: ids[q] == ids[kv], None, None, n, n, device="cpu")
    mask = segment_block_mask(_cu(lengths), n)
    assert torch.equal(mask.to_dense(), dense.to_dense())
    # blocks inside one segment skip the mask_mod (full blocks), as the dense construction finds them
    assert torch.equal(mask.full_kv_num_blocks, dense.full_kv_num_blocks)
    # the query-side tables (the backward's) are the key-side ones: what transposing them gives
    for side in ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(mask, side), getattr(dense, side)), side


def test_block_mask_without_the_symmetric_constructor_is_the_same(monkeypatch):
    S = importlib.import_module("prune.kernels.segmented_attention")  # noqa: N806

    cu, n = _cu([100, 150, 50, 3]), 303
    built = S.segment_block_mask(cu, n, padded=True)
    monkeypatch.setattr(S, "_symmetric_constructor", lambda: False)
    transposed = S.segment_block_mask(cu, n, padded=True)
    for side in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices", "q_num_blocks", "q_indices",
                 "full_q_num_blocks", "full_q_indices"):
        assert torch.equal(getattr(built, side), getattr(transposed, side)), side
    assert built.seq_lengths == transposed.seq_lengths and built.BLOCK_SIZE == transposed.BLOCK_SIZE


@pytest.mark.parametrize("bad", [[0, 5, 9], [1, 5, 10], [0, 6, 5, 10]])
def test_bad_cu_seqlens(bad):
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="cu_seqlens"):
        segmented_attention_reference(q, q, q, torch.tensor(bad))
    with pytest.raises(ValueError, match="cu_seqlens"):
        segmented_attention_flex(q, q, q, torch.tensor(bad), compiled=False)


# ---- tiny encoders: eager == SDPA == segmented --------------------------------------------------
def _model(family, impl):
    if family == "qwen3_5":
        if not hasattr(transformers, "Qwen3_5ForConditionalGeneration"):
            pytest.skip("no Qwen3.5 in this transformers")
        from prune._tiny import tiny_qwen3_5

        return tiny_qwen3_5(attn_implementation=impl)
    if family == "qwen2_5_omni":
        if not hasattr(transformers, "Qwen2_5OmniThinkerForConditionalGeneration"):
            pytest.skip("no Qwen2.5-Omni in this transformers")
        from prune._tiny import tiny_omni_thinker

        return tiny_omni_thinker(attn_implementation=impl)
    if family == "qwen3_vl":
        if not HAS_QWEN3:
            pytest.skip("no Qwen3-VL in this transformers")
        return tiny_qwen3_vl(attn_implementation=impl)
    return tiny_qwen_vl({"qwen2_5_vl": "2.5", "qwen2_vl": "2"}[family], attn_implementation=impl)


def _inputs(family, media=MEDIA, text=9):
    build = qwen3_prompts if family in ("qwen3_vl", "qwen3_5") else qwen_prompts
    inputs = build([media], [text])
    for kind, pv, grid in (("image", "pixel_values", "image_grid_thw"), ("video", "pixel_values_videos",
                                                                        "video_grid_thw")):
        grids = [g for k, g in media if k == kind]
        if grids:
            inputs[pv], inputs[grid] = qwen_media(grids, seed=len(kind))
    return inputs


def _features(model, inputs):
    """Encoder + merger outputs of every modality, as one (rows, D) tensor per modality."""
    from prune.evaluation.bench_encoder import _encoder_output

    mm = adapter_for(model).multimodal_module()
    out = {}
    with torch.no_grad():
        if "pixel_values" in inputs:
            out["image"] = _encoder_output(mm.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]))
        if "pixel_values_videos" in inputs:
            out["video"] = _encoder_output(
                mm.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
            )
    return out


@pytest.fixture
def flex_kernel(monkeypatch):
    """Route the model's segmented attention through (eager) FlexAttention instead of the CPU reference."""
    monkeypatch.setattr(VA, "segmented_attention", lambda q, k, v, cu, scale=None: segmented_attention_flex(
        q, k, v, cu, scale=scale, compiled=False))


FAMILIES = ["qwen2_5_vl", "qwen2_vl", "qwen3_vl"]
ENCODER_FAMILIES = [*FAMILIES, "qwen2_5_omni", "qwen3_5"]  # Omni's prompts interleave audio: encoder alone


@pytest.mark.parametrize("family", ENCODER_FAMILIES)
@pytest.mark.parametrize("kernel", ["reference", "flex"])
def test_encoder_eager_and_sdpa_and_segmented(family, kernel, request):
    if kernel == "flex":
        request.getfixturevalue("flex_kernel")
    inputs = _inputs(family)
    eager = _features(_model(family, "eager"), inputs)
    sdpa_model = _model(family, "sdpa")
    sdpa = _features(sdpa_model, inputs)
    prune.wrap(sdpa_model, "hiprune", keep=1.0, vision_attention="segmented")
    segmented = _features(sdpa_model, inputs)
    for modality in eager:
        torch.testing.assert_close(sdpa[modality], eager[modality], atol=1e-5, rtol=0)
        torch.testing.assert_close(segmented[modality], eager[modality], atol=1e-5, rtol=0)
        if kernel == "reference":  # the same SDPA calls, one per segment
            assert torch.equal(segmented[modality], sdpa[modality])


@pytest.mark.parametrize("keep", [1.0, 0.4])
@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_one_call_per_layer_with_cu_seqlens_on_this_version(family, keep, monkeypatch):
    """The seam (see prune/hooks/vision_attention.py): transformers routes a module whose config reads
    as our 'flash' name to its varlen path, so each vision layer makes ONE attention call, with
    cu_seqlens. A release that decides otherwise makes this fail (0 calls), not silently slow.
    At keep < 1 hiprune taps two layers: they too make one call (the tap's flash name), not one per
    segment with a ``lengths.tolist()`` that waits for the GPU."""
    calls = []

    def spy(q, k, v, cu, scale=None):
        calls.append((q.shape[2], cu.tolist()))
        return segmented_attention_reference(q, k, v, cu, scale=scale)

    monkeypatch.setattr(VA, "segmented_attention", spy)
    model = _model(family, "sdpa")
    depth = len(adapter_for(model).vision_attention_modules())
    inputs = _inputs(family)
    prune.wrap(model, "hiprune", keep=keep, vision_attention="segmented")
    tapped = [m for m in adapter_for(model).vision_attention_modules()
              if m.config._attn_implementation == TAP_FLASH_NAME]
    assert len(tapped) == (0 if keep == 1.0 else 2)
    _features(model, inputs)
    assert len(calls) == 2 * depth  # image and video encoder runs
    image, video = calls[:depth], calls[depth:]
    assert all(n == 96 and cu[0] == 0 and cu[-1] == 96 for n, cu in image)
    assert all(n == 128 and cu == [0, 64, 128] for n, cu in video[-1:])  # the last block: one segment per slice
    if family in ("qwen2_5_vl", "qwen2_5_omni"):  # windowed blocks: windows of 2x2 merge units (16 patches)
        assert [len(cu) - 1 for _, cu in image] == [6, 1, 6, 1]
    if family == "qwen2_5_omni":  # the audio encoder keeps its own attention
        audio = adapter_for(model).audio_tower()
        assert all(m.config._attn_implementation == "sdpa" for m in audio.modules() if "config" in m.__dict__)


@pytest.mark.parametrize("family", FAMILIES)
def test_segmented_layers_do_not_read_the_longest_segment_back(family, monkeypatch):
    """Under the varlen path a Qwen vision attention computes ``max_seqlen`` from ``cu_seqlens`` with a
    device read per layer when the caller passes none (transformers 5.17-5.24 pass none for a vision
    config that is not flash). The segmented install passes an upper bound instead: no ``item`` inside
    any vision attention forward. Without that pre-hook there is one per layer (the test can fail)."""
    inside, reads = [False], []
    real_item = torch.Tensor.item

    def item(self):
        if inside[0]:
            reads.append(1)
        return real_item(self)

    monkeypatch.setattr(torch.Tensor, "item", item)
    inputs = _inputs(family, media=[("image", (1, 8, 12))])

    def enter(module, args, kwargs):
        inside[0] = True
        seen.append(kwargs.get("max_seqlen"))

    def leave(module, args, output):
        inside[0] = False

    counts = {}
    for bound in (False, True):
        model, seen = _model(family, "sdpa"), []
        with monkeypatch.context() as patch:
            if not bound:
                patch.setattr(VA, "_max_length_position", lambda module: None)
            prune.wrap(model, "hiprune", keep=1.0, vision_attention="segmented")
        for module in adapter_for(model).vision_attention_modules():  # registered after prune's hooks
            module.register_forward_pre_hook(enter, with_kwargs=True)
            module.register_forward_hook(leave)
        reads.clear()
        _features(model, inputs)
        counts[bound] = len(reads)
        if bound:
            assert seen and all(isinstance(v, int) and v >= 96 for v in seen)  # the row count: an upper bound
    depth = len(adapter_for(model).vision_attention_modules())
    assert counts == {False: depth, True: 0}


def test_seam_is_available_on_this_version():
    attn = adapter_for(tiny_qwen_vl("2.5")).vision_attention_modules()
    assert VA.seam_available(attn) is None
    from transformers.utils.generic import is_flash_attention_requested

    assert is_flash_attention_requested(requested_attention_implementation=VA.SEGMENTED_NAME)
    assert not is_flash_attention_requested(requested_attention_implementation=TAP_NAME)  # a tap over sdpa / eager
    assert is_flash_attention_requested(requested_attention_implementation=TAP_FLASH_NAME)  # a tap over the seam


def test_seam_gone_fails_loudly(monkeypatch):
    import transformers.utils.generic as generic

    monkeypatch.setattr(generic, "is_flash_attention_requested", lambda *a, **k: False)
    model = tiny_qwen_vl("2.5", attn_implementation="sdpa")
    with pytest.raises(ValueError, match="vision_attention='segmented'"):
        prune.wrap(model, "hiprune", keep=1.0, vision_attention="segmented")
    assert getattr(model, "prune_state", None) is None
    prune.wrap(model, "hiprune", keep=1.0)  # the default falls back to the model's own attention
    assert model.prune_state.vision_attention == "default"


def test_inference_mode(flex_kernel):
    model = tiny_qwen_vl("2.5", attn_implementation="sdpa")
    inputs = _inputs("qwen2_5_vl")
    with torch.inference_mode():
        ref = model(**inputs).logits
        prune.wrap(model, "hiprune", keep=1.0, vision_attention="segmented")
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_per_segment_call_without_tap_warns_and_stays_right(monkeypatch):
    """If a release routed the module to its per-segment loop anyway, the output is still right."""
    import sys

    model = tiny_qwen_vl("2.5", attn_implementation="sdpa")
    inputs = _inputs("qwen2_5_vl", media=[("image", (1, 8, 12))])
    ref = _features(model, inputs)["image"]
    prune.wrap(model, "hiprune", keep=1.0, vision_attention="segmented")
    modeling = sys.modules[type(adapter_for(model).vision_attention_modules()[0]).__module__]
    monkeypatch.setattr(modeling, "is_flash_attention_requested", lambda *a, **k: False)
    monkeypatch.setattr(VA, "_warned", set())
    with pytest.warns(RuntimeWarning, match="per segment"):
        out = _features(model, inputs)["image"]
    assert torch.equal(out, ref)


# ---- wrapped models -----------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_identity_at_keep_one_segmented(family, impl):
    model = _model(family, impl)
    inputs = _inputs(family)
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, "hiprune", keep=1.0, vision_attention="segmented")
        assert model.prune_state.vision_attention == "segmented"
        out = model(**inputs).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    if impl == "sdpa":
        assert torch.equal(out, ref)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_tap_statistics_identity_with_segmented(family, impl):
    """hiprune taps two encoder layers. Under "default" they run the model's per-segment loop, under
    "segmented" one call with cu_seqlens (the tap's flash name): the statistics (normalised per
    segment either way) and the kept tokens are the same."""
    inputs = _inputs(family)
    records = {}
    for mode in ("default", "segmented"):
        model = _model(family, impl)
        prune.wrap(model, "hiprune", keep=0.4, vision_attention=mode)
        with torch.no_grad():
            logits = model(**inputs).logits
        records[mode] = (logits, model.prune_state.last)
    (l0, r0), (l1, r1) = records["default"], records["segmented"]
    assert torch.equal(r0.keep_mask, r1.keep_mask)
    for a, b in zip(r0.images, r1.images, strict=True):
        assert torch.equal(a.kept, b.kept)
        if impl == "sdpa":
            assert torch.equal(a.scores["score"], b.scores["score"])
        else:  # untapped layers before a tapped one ran SDPA (the reference) instead of eager
            torch.testing.assert_close(a.scores["score"], b.scores["score"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=0)


def test_unwrap_restores_exactly_and_language_model_untouched():
    model = tiny_qwen_vl("2.5", attn_implementation="sdpa")
    adapter = adapter_for(model)
    vision = adapter.vision_attention_modules()
    lm_attn = [m for m in adapter.language_model().modules() if hasattr(m, "config") and m is not adapter.language_model()]
    before = [m.config for m in vision]
    lm_before = [m.config for m in lm_attn]
    registered = set(ALL_ATTENTION_FUNCTIONS)
    prune.wrap(model, "hiprune", keep=0.4, vision_attention="segmented")
    assert all(m.config._attn_implementation in (VA.SEGMENTED_NAME, TAP_FLASH_NAME) for m in vision)
    assert [m.config for m in lm_attn] == lm_before and all(c is d for c, d in zip(
        [m.config for m in lm_attn], lm_before, strict=True))
    assert all(m.config._attn_implementation == "sdpa" for m in lm_attn)
    assert model.config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert set(ALL_ATTENTION_FUNCTIONS) - registered <= {VA.SEGMENTED_NAME, TAP_NAME, TAP_FLASH_NAME}
    prune.unwrap(model)
    assert all(m.config is c for m, c in zip(vision, before, strict=True))
    assert all(m.config is c for m, c in zip(lm_attn, lm_before, strict=True))
    # an unwrapped model of the same class is untouched by another's wrap
    other = tiny_qwen_vl("2.5", attn_implementation="sdpa")
    prune.wrap(model, "hiprune", keep=1.0, vision_attention="segmented")
    assert all(m.config._attn_implementation == "sdpa" for m in adapter_for(other).vision_attention_modules())


def test_rewrap_and_copies():
    model = tiny_qwen_vl("2.5", attn_implementation="sdpa")
    inputs = _inputs("qwen2_5_vl")
    vision = adapter_for(model).vision_attention_modules()
    before = [m.config for m in vision]
    with torch.no_grad():
        ref = model(**inputs).logits
    prune.wrap(model, "hiprune", keep=0.4, vision_attention="segmented")
    prune.wrap(model, "hiprune", keep=1.0, vision_attention="segmented")  # re-wrap: views replaced, not stacked
    assert all(type(m.config) is VA.SegmentedConfigView for m in vision)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert clone.prune_state.vision_attention == "segmented"
        with torch.no_grad():
            assert torch.equal(clone(**inputs).logits, ref)
    prune.wrap(model, "hiprune", keep=1.0, vision_attention="default")
    assert all(m.config is c for m, c in zip(vision, before, strict=True))


def test_default_is_segmented_only_on_cuda_for_eager_or_sdpa(monkeypatch):
    model = tiny_qwen_vl("2.5", attn_implementation="sdpa")
    prune.wrap(model, "hiprune", keep=1.0)
    assert model.prune_state.vision_attention == "default"  # CPU
    assert VA.auto_choice("sdpa", "cuda") == "segmented"
    assert VA.auto_choice("eager", "cuda") == "segmented"
    assert VA.auto_choice(None, "cuda") == "segmented"
    assert VA.auto_choice("flash_attention_2", "cuda") == "default"
    assert VA.auto_choice("sdpa", "cpu") == "default"
    llava = tiny_llava()
    prune.wrap(llava, "hiprune", keep=1.0)
    assert llava.prune_state.vision_attention == "default"


def test_bad_values_name_the_argument():
    model = tiny_qwen_vl("2.5")
    with pytest.raises(ValueError, match="vision_attention"):
        prune.wrap(model, "hiprune", keep=0.5, vision_attention="fast")
    with pytest.raises(ValueError, match="vision_attention"):
        prune.PruneConfig(method="hiprune", vision_attention="flex")
    with pytest.raises(TypeError, match="PruneConfig"):
        prune.wrap(model, prune.PruneConfig(method="hiprune"), vision_attention="segmented")
    llava = tiny_llava()
    with pytest.raises(ValueError, match="vision_attention='segmented'.*no windows"):
        prune.wrap(llava, "hiprune", keep=0.5, vision_attention="segmented")
    assert getattr(llava, "prune_state", None) is None
    prune.wrap(model, prune.PruneConfig(method="hiprune", keep=1.0, vision_attention="segmented"))
    assert model.prune_state.vision_attention == "segmented"


# ---- benchmark smoke test -----------------------------------------------------------------------
def test_bench_encoder_cli_smoke(tmp_path, capsys):
    import json

    from prune.cli import main

    rc = main(["bench-encoder", "--model", "tiny-qwen2.5-vl", "--device", "cpu", "--rounds", "1", "--warmup", "0",
               "--image-size", "112", "--frames", "2", "--frame-size", "56", "--prompt-tokens", "8",
               "--batches", "1,2", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    result = json.loads(next(tmp_path.glob("bench_encoder_*.json")).read_text())
    assert result["schema"] == "prune.bench_encoder/1"
    rows = result["rows"]
    modes = ("default", "segmented")
    assert {(r["kind"], r["input"], r["attention"], bool(r.get("tapped"))) for r in rows if r["kind"] == "encoder"} == {
        ("encoder", modality, mode, tapped) for modality in ("image", "video") for mode in modes
        for tapped in (False, True)
    }
    timed = {(r["kind"], r["input"], r["batch"], r["keep"], r["stage"], r["attention"]) for r in rows
             if r["kind"] != "encoder"}
    assert timed == {
        (kind, modality, batch, keep, stage, mode) for kind in ("prefill", "ttft") for modality in ("image", "video")
        for batch in (1, 2) for keep, stage in ((1.0, None), (0.11, "post_encoder"), (0.11, "encoder"))
        for mode in modes
    }
    assert all(r["ms"] > 0 and r["rounds"] == 1 for r in rows)
    assert all(r["speedup"] > 0 for r in rows if r["attention"] == "segmented")
    assert all(r["vs_unpruned"] > 0 and r["vs_default"] > 0 for r in rows if r.get("keep") == 0.11)
    assert all(r["tap_overhead"] is not None for r in rows if r.get("tapped"))
    for d in result["max_abs_diff"].values():  # the CPU reference runs the same SDPA calls
        assert d["max_abs_diff"] <= 1e-5 and d["max_abs"] > 0
    out = capsys.readouterr().out
    assert "| encoder | image | 1 |" in out and "| ttft | video | 2 | hiprune @ 0.11 | encoder |" in out
    assert next(tmp_path.glob("bench_encoder_*.png")).stat().st_size > 0


def test_bench_encoder_inputs_choose_the_media_and_compile_needs_cuda(tmp_path, capsys):
    import json

    from prune.cli import main

    common = ["bench-encoder", "--model", "tiny-qwen2.5-vl", "--device", "cpu", "--rounds", "1", "--warmup", "0",
              "--image-size", "112", "--frames", "2", "--frame-size", "56", "--prompt-tokens", "8", "--no-progress",
              "--no-ttft", "--no-tap", "--stages", "encoder", "--out", str(tmp_path)]
    assert main([*common, "--inputs", "image"]) == 0
    result = json.loads(next(tmp_path.glob("bench_encoder_*.json")).read_text())
    assert {r["input"] for r in result["rows"]} == {"image"} and set(result["max_abs_diff"]) == {"image"}
    assert result["settings"]["inputs"] == ["image"] and result["settings"]["compile"] is False
    capsys.readouterr()
    assert main([*common, "--inputs", "image,audio"]) == 2
    assert "--inputs: audio" in capsys.readouterr().err
    assert main([*common, "--compile"]) == 2
    assert "needs --device cuda" in capsys.readouterr().err


def test_bench_encoder_static_cache_rows_equal_dynamic_cache_rows():
    """``--compile``'s prefill rows run on a static cache (one per input, reset per call): the pruned
    encoder-stage prefill and the unpruned one give the logits of the dynamic-cache forward, call
    after call (run here without the compiler, which needs CUDA graphs)."""
    from prune._tiny import tiny_qwen_vl
    from prune.evaluation.bench import _CacheMaker, _Clock
    from prune.evaluation.bench_encoder import _PrefillRow
    from tests.test_qwen import KINDS, make_inputs

    model = tiny_qwen_vl("2.5", attn_implementation="sdpa").eval()
    inputs = make_inputs([KINDS["image"]], [9])
    cache = _CacheMaker(True, inputs, 1)
    for keep, stage in ((1.0, None), (0.3, "encoder")):
        row = _PrefillRow(model, "image", "segmented", inputs, _Clock(torch.device("cpu")), "hiprune", keep, stage)
        row.enter()
        try:
            with torch.no_grad():
                dynamic = row.run().logits
                row.cache = cache
                first, second = row.run().logits, row.run().logits
        finally:
            row.exit()
        torch.testing.assert_close(first, dynamic, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(second, dynamic, atol=1e-5, rtol=1e-5)
    assert len(cache.caches) == 1  # one static cache for the input, shared by its rows


# ---- GPU: the compiled FlexAttention path --------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("lengths", [[64] * 76 + [36] * 5, [4900], [1024] * 16, [128] * 40 + [7]])
def test_gpu_compiled_flex_equals_reference(lengths):
    """Qwen2.5-VL-7B-like shapes: 16 heads of 80, windows of 64 patches (1344 px image: 4900 patches),
    full attention over one image, a 32-frame video's 16 temporal slices of 1024 patches."""
    n = sum(lengths)
    gen = torch.Generator(device="cuda").manual_seed(n)
    q, k = (torch.randn(1, 16, n, 80, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    v = torch.randn(n, 16, 80, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(0, 1)[None]  # strided
    cu = _cu(lengths, "cuda")
    out = segmented_attention(q, k, v, cu)
    ref = segmented_attention_reference(q.float(), k.float(), v.float(), cu)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)


@gpu
@needs_cuda
def test_gpu_small_head_dim_takes_the_dense_masked_call():
    """Head dim 8 (FlexAttention's kernel needs 16): one masked SDPA call, no host read, so it can be
    captured in a CUDA graph (vision_graphs)."""
    q = torch.randn(1, 4, 96, 8, device="cuda")
    cu = _cu([16, 0, 32, 48], "cuda")
    segmented_attention(q, q, q, cu)  # warm-up outside the capture
    torch.cuda.synchronize()
    with torch.cuda.graphs.graph(graph := torch.cuda.CUDAGraph()):
        captured = segmented_attention(q, q, q, cu)
    graph.replay()
    torch.testing.assert_close(captured, segmented_attention_reference(q, q, q, cu), atol=1e-6, rtol=1e-6)


@gpu
@needs_cuda
def test_gpu_new_segments_of_one_length_do_not_recompile():
    from torch._dynamo.utils import counters

    n = 2048
    q = torch.randn(1, 4, n, 64, device="cuda", dtype=torch.bfloat16)
    segmented_attention(q, q, q, _cu([1024, 1024], "cuda"))
    frames = counters["stats"]["unique_graphs"]
    for lengths in ([64] * 32, [2000, 48], [512] * 4):
        segmented_attention(q, q, q, _cu(lengths, "cuda"))
    assert counters["stats"]["unique_graphs"] == frames


@gpu
@needs_cuda
@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_gpu_wrapped_default_is_segmented_and_close(family, monkeypatch):
    tiny = _model(family, "sdpa")
    config = copy.deepcopy(tiny.config)
    vision = getattr(config, "vision_config", None) or config.thinker_config.vision_config
    vision.num_heads = 2  # head dim 16: the smallest FlexAttention's CUDA kernel takes (the tiny's is 8)
    torch.manual_seed(0)
    model = type(tiny)(config).eval().to("cuda", torch.bfloat16)
    calls = []
    monkeypatch.setattr(VA, "segmented_attention", lambda *a, **k: calls.append(1) or segmented_attention(*a, **k))
    inputs = {k: v.to("cuda") for k, v in _inputs(family).items()}
    inputs = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in inputs.items()}
    ref = _features(model, inputs)
    prune.wrap(model, "hiprune", keep=1.0)
    assert model.prune_state.vision_attention == "segmented"
    out = _features(model, inputs)
    assert calls  # the compiled FlexAttention path ran
    for modality in ref:
        torch.testing.assert_close(out[modality].float(), ref[modality].float(), atol=3e-2, rtol=3e-2)


def test_lmms_model_args_take_vision_attention():
    lmms_plugin = pytest.importorskip("prune.evaluation.lmms_plugin")
    _, config, rest = lmms_plugin.split_model_args(
        {"base": "qwen2_5_vl", "method": "random", "keep": 0.5, "vision_attention": "segmented", "pretrained": "p"}
    )
    assert config.vision_attention == "segmented" and rest == {"pretrained": "p"}
    _, config, _ = lmms_plugin.split_model_args(
        {"base": "qwen2_5_vl", "method": "random", "vision_graphs": "True", "vision_compile": True}
    )
    assert config.vision_graphs is True and config.vision_compile is True
    with pytest.raises(ValueError, match="vision_compile must be True or False"):
        lmms_plugin.split_model_args({"base": "qwen2_5_vl", "method": "random", "vision_compile": "maybe"})


def test_block_mask_cache_follows_the_tensor_object():
    import importlib

    SA = importlib.import_module("prune.kernels.segmented_attention")  # noqa: N806 - the module, not the function

    cu = _cu([10, 20])
    first = SA._cached_block_mask(cu, 30, torch.device("cpu"))
    assert SA._cached_block_mask(cu, 30, torch.device("cpu")) is first  # the layers of one forward
    same_values = _cu([10, 20])
    assert SA._cached_block_mask(same_values, 30, torch.device("cpu")) is not first  # another forward's tensor
    cu[1] = 5  # changed in place: a new mask
    changed = SA._cached_block_mask(cu, 30, torch.device("cpu"))
    assert changed is not first
    assert torch.equal(changed.to_dense(), segment_block_mask(_cu([5, 25]), 30).to_dense())


@pytest.mark.parametrize("lengths", [(50, 80, 70), (128,), (3, 1, 300)])
def test_compiled_path_pads_to_whole_blocks_and_equals_the_reference(lengths, monkeypatch):
    """The compiled path pads the rows to whole 128-row blocks (a segment of their own) so lengths
    share compiled code; run here with eager FlexAttention in its place."""
    import importlib

    from torch.nn.attention.flex_attention import flex_attention

    sa = importlib.import_module("prune.kernels.segmented_attention")
    seen = []

    def eager(q, k, v, block_mask, scale, enable_gqa):
        seen.append(q.shape[2])
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)

    monkeypatch.setattr(sa, "_compiled_flex", lambda context: eager)
    n = sum(lengths)
    q, k, v = (torch.randn(2, 4, n, 16) for _ in range(3))
    cu = _cu(lengths)
    out = sa.segmented_attention_flex(q, k, v, cu, compiled=True)
    assert seen == [-(-n // 128) * 128] and out.shape == q.shape
    torch.testing.assert_close(out, segmented_attention_reference(q, k, v, cu), atol=1e-5, rtol=1e-5)


def test_compile_limits_fall_back_to_the_reference_with_a_warning(monkeypatch):
    import importlib

    sa = importlib.import_module("prune.kernels.segmented_attention")
    if not sa._COMPILE_LIMITS:
        pytest.skip("this torch names no recompile-limit error")

    def over_the_limit(*args, **kwargs):
        raise sa._COMPILE_LIMITS[0]("recompile limit hit")

    monkeypatch.setattr(sa, "_compiled_flex", lambda context: over_the_limit)
    monkeypatch.setattr(sa, "_FALLBACK_WARNED", __import__("threading").Event())
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    cu = _cu((10, 30))
    with pytest.warns(RuntimeWarning, match="limits"):
        out = sa.segmented_attention_flex(q, k, v, cu, compiled=True)
    torch.testing.assert_close(out, segmented_attention_reference(q, k, v, cu), atol=1e-6, rtol=1e-6)


def test_compiled_flex_has_one_function_per_calling_context_and_one_layout(monkeypatch):
    """dynamo tells a call inside the ``prune::segmented_attention`` operator (a compiled vision
    layer), a call with autograd on and an eager no-grad call apart by their tensors' dispatch keys
    and checks strides: one shared compiled function held a graph per length per context and passed
    dynamo's recompile limit (then FlexAttention runs uncompiled). Each context gets its own compiled
    function, and every call hands it contiguous rows (a transposed view at a whole number of blocks
    would be another graph)."""
    import importlib

    from torch.nn.attention.flex_attention import flex_attention

    sa = importlib.import_module("prune.kernels.segmented_attention")
    calls = []

    def make(context):
        def run(q, k, v, block_mask, scale, enable_gqa):
            calls.append((context, q.is_contiguous(), k.is_contiguous(), v.is_contiguous()))
            return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)
        return run

    monkeypatch.setattr(sa, "_compiled_flex", make)
    n = 128  # a whole block: no padding copy
    q, k, v = (torch.randn(1, n, 2, 16).transpose(1, 2) for _ in range(3))  # (B, H, N, d) views, Qwen's layout
    assert not q.is_contiguous()
    cu = _cu((40, 88))
    ref = segmented_attention_reference(q, k, v, cu)
    with torch.no_grad():
        plain = sa.segmented_attention_flex(q, k, v, cu, compiled=True)
        inside = sa.segmented_attention_flex(q, k, v, cu, compiled=True, _inside_op=True)
    with torch.inference_mode():
        inference = sa.segmented_attention_flex(q, k, v, cu, compiled=True)
    contexts = [c[0] for c in calls]
    assert len(set(contexts)) == 3, contexts
    assert all(all(c[1:]) for c in calls)
    for out in (plain, inside, inference):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    graded = q.detach().clone().requires_grad_(True)  # (FlexAttention's backward needs CUDA: the context only)
    assert sa._flex_context(graded, False) not in contexts


def test_compiled_flex_functions_of_two_contexts_are_distinct_code_objects():
    """dynamo caches per code object: two contexts must not share one (or its recompile limit)."""
    import importlib

    sa = importlib.import_module("prune.kernels.segmented_attention")
    a, b = sa._compiled_flex((True, False, False)), sa._compiled_flex((False, False, False))
    assert a is not b and a is sa._compiled_flex((True, False, False))
    code = lambda f: getattr(f, "_torchdynamo_orig_callable", f).__code__  # noqa: E731
    assert code(a) is not code(b) and code(a).co_name != code(b).co_name
