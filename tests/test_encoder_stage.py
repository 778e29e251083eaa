"""Contracts of pruning inside the vision encoder (``stage="encoder"``): identity, the oracle (the
encoder's later layers run by hand on the gathered rows, then the unwrapped language model on the
reduced inputs), batch = singles, eager = SDPA, the selection it makes, bad input, unwrap."""

import pytest
import torch

import prune
from prune._tiny import tiny_gemma3, tiny_internvl, tiny_llava_onevision
from tests.oracle import reduced_positions, run_reduced

FAMILIES = ["llava", "llava_dinov2", "llava_next"]
# (method, options): cls reads layer 1 of 4 so its cut leaves layers to run on fewer rows
METHODS = [("hiprune", {}), ("cls", {"layer": 1}), ("cls", {"variant": "vtc", "start": 1})]
GEN = {"max_new_tokens": 8, "min_new_tokens": 8, "do_sample": False}


def _ids(params):
    return f"{params[0]}-{'-'.join(f'{k}={v}' for k, v in params[1].items())}"


def _vision(model):
    """(embeddings -> first layer input, the layer list, how to call one layer) of the tiny towers."""
    tower = model.model.vision_tower
    vm = getattr(tower, "vision_model", tower)
    if hasattr(vm, "pre_layrnorm"):  # CLIP
        return (lambda px: vm.pre_layrnorm(vm.embeddings(px))), vm.encoder.layers, (lambda layer, h: layer(h, None))
    if hasattr(vm.encoder, "layers"):  # SigLIP
        return vm.embeddings, vm.encoder.layers, (lambda layer, h: layer(h, None))
    return vm.embeddings, vm.encoder.layer, (lambda layer, h: layer(h))  # DINOv2


@torch.no_grad()
def encoder_by_hand(model, pixel_values, patch_masks, cut, cls=True):
    """Per image: layers 0..cut on every row, then the rows of ``patch_masks`` (+ [CLS]) only through
    the feature layer, [CLS] dropped, projector: (kept, D) LLM-input rows per image."""
    embed, layers, call = _vision(model)
    layer = model.config.vision_feature_layer
    hidden_index = layer if layer >= 0 else layer + len(layers) + 1  # hidden_states[k]: output of layer k-1
    lead = int(cls)
    out = []
    for px, mask in zip(pixel_values, patch_masks):
        h = embed(px[None])
        for i in range(hidden_index):
            h = call(layers[i], h)
            if i == cut:
                rows = lead + torch.nonzero(mask, as_tuple=True)[0]
                h = h[:, torch.cat([mask.new_zeros(lead, dtype=torch.long), rows])]
        out.append(model.model.multi_modal_projector(h[0, lead:]))
    return out


def tiny_llava_siglip(attn="eager"):
    """LLaVA with a SigLIP tower (no [CLS], every patch a token: strategy "full")."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    from prune._tiny import IMAGE_TOKEN, PAD_TOKEN, _text

    torch.manual_seed(0)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                image_size=32, patch_size=4, vision_use_head=False)
    config = LlavaConfig(vision_config=vision, text_config=_text(64, 2), image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="full")
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()


@pytest.mark.parametrize("positions", ["original", "compact"])
def test_encoder_stage_oracle_on_siglip(positions):
    from prune._tiny import build_prompts

    model = tiny_llava_siglip()
    pixel_values = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids, mask = build_prompts([[64, 64]], [12])
    inputs = {"input_ids": ids, "attention_mask": mask, "pixel_values": pixel_values}
    with torch.no_grad():
        ref = model(**inputs).logits
        prune.wrap(model, "hiprune", keep=1.0, stage="encoder")
        torch.testing.assert_close(model(**inputs).logits, ref, atol=1e-6, rtol=0)
        prune.wrap(model, "hiprune", keep=0.25, positions=positions, stage="encoder")
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
    prune.unwrap(model)
    assert record.vision_tokens_after == 32
    feats = encoder_by_hand(model, pixel_values, [im.view_masks()[0] for im in record.images], _cut(model, "hiprune", {}), cls=False)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)[0]
    for im, rows in zip(record.images, feats):
        embeds[im.positions[im.kept]] = rows
    keep = record.keep_mask[0]
    ref_logits, _ = run_reduced(model, embeds[keep], reduced_positions(keep, positions), steps=0)
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="CLS"):
        prune.wrap(model, "cls", keep=0.25, stage="encoder")


def next_reduced_embeds(model, inputs, record, cut):
    """LLaVA-NeXT: the LLM-input rows of every kept token, each view's rows run by hand alone
    (newline tokens are the model's image_newline): (L, D) embeddings of prompt 0."""
    embeds = model.get_input_embeddings()(inputs["input_ids"])[0].clone()
    for i, im in enumerate(record.images):
        masks = im.view_masks()
        feats = [encoder_by_hand(model, inputs["pixel_values"][i, v][None], [masks[v]], cut)[0]
                 for v in range(len(im.grids))]
        for pos, view, patch in zip(im.positions[im.kept], im.token_view[im.kept], im.token_patch[im.kept]):
            if view < 0:
                embeds[pos] = model.model.image_newline
            else:
                rank = int(masks[view][:patch].sum())  # kept patches of the view before this one
                embeds[pos] = feats[view][rank]
    return embeds


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("method", METHODS[:2], ids=_ids)
def test_encoder_stage_llava_next_oracle_with_ragged_views(make_case, method, positions):
    """Base image and crops keep different counts: padded inside the encoder, the padding masked;
    every view's rows equal that view run alone on its kept rows."""
    name, options = method
    case = make_case("llava_next", prompts=((1, 3),), text_lens=(12,))
    inputs = case.inputs()
    model = prune.wrap(case.model, name, keep=0.3, positions=positions, stage="encoder", **options)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    assert any(len(set(im.view_budgets)) > 1 for im in record.images)  # ragged views
    assert all(im.selected == im.budget for im in record.images)
    prune.unwrap(model)
    with torch.no_grad():
        embeds = next_reduced_embeds(model, inputs, record, _cut(model, name, options))
    keep = record.keep_mask[0]
    ref_logits, ref_tokens = run_reduced(model, embeds[keep], reduced_positions(keep, positions))
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    eos = model.generation_config.eos_token_id  # generate's min_new_tokens forbids it; the oracle does not
    n = ref_tokens.index(eos) if eos in ref_tokens else len(ref_tokens)
    assert generated[:n] == ref_tokens[:n]


def _cut(model, method, options):
    obj = model.config.vision_config.num_hidden_layers
    if method == "hiprune":
        return max(0, round(0.375 * obj) - 1)
    if options.get("variant") == "vtc":
        return obj - 2
    return options["layer"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS, ids=_ids)
def test_encoder_stage_identity_at_keep_one(make_case, family, method):
    name, options = method
    case = make_case(family, prompts=((0,), (1,)), text_lens=(6, 9))
    inputs = case.inputs()
    with torch.no_grad():
        ref = case.model(**inputs).logits
        for keep in (1.0, 64):  # 64 = every patch of the 8x8 grid: the cut runs and keeps all rows
            prune.wrap(case.model, name, keep=keep, stage="encoder", **options)
            out = case.model(**inputs).logits
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
            assert bool(case.model.prune_state.last.keep_mask.all())


@pytest.mark.parametrize("positions", ["original", "compact"])
@pytest.mark.parametrize("family", FAMILIES[:2])
@pytest.mark.parametrize("method", METHODS, ids=_ids)
def test_encoder_stage_oracle_prefill_and_generate(make_case, family, method, positions):
    name, options = method
    case = make_case(family, prompts=((0, 1),), text_lens=(12,))  # two images in one prompt
    inputs = case.inputs()
    model = prune.wrap(case.model, name, keep=0.25, positions=positions, stage="encoder", **options)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**inputs, **GEN)[0, inputs["input_ids"].shape[1] :].tolist()
    keep = record.keep_mask[0]
    assert record.vision_tokens_after == 2 * 16
    prune.unwrap(model)
    masks = [im.view_masks()[0] for im in record.images]
    feats = encoder_by_hand(model, inputs["pixel_values"], masks, _cut(model, name, options))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(inputs["input_ids"])[0]
    for im, rows in zip(record.images, feats):
        embeds[im.positions[im.kept]] = rows  # the kept rows of each image, in their original order
    ref_logits, ref_tokens = run_reduced(model, embeds[keep], reduced_positions(keep, positions))
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated == ref_tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS, ids=_ids)
def test_encoder_stage_selects_from_the_statistics_before_the_cut(make_case, family, method):
    """The kept set is what the post-encoder method picks from the same layers: cls at its layer(s),
    hiprune with its registers from the object layer (deep_layer = object layer)."""
    name, options = method
    case = make_case(family, prompts=((0,), (1, 2)), text_lens=(6, 9), seed=1)
    inputs = case.inputs()
    post = dict(options)
    if name == "hiprune":
        post["deep_layer"] = _cut(case.model, name, options)
    with torch.no_grad():
        prune.wrap(case.model, name, keep=0.2, **post)
        case.model(**inputs)
        ref = case.model.prune_state.last.keep_mask
        prune.wrap(case.model, name, keep=0.2, stage="encoder", **options)
        case.model(**inputs)
        got = case.model.prune_state.last.keep_mask
    assert torch.equal(got, ref)
    assert not bool(got.all())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", METHODS[:2], ids=_ids)
def test_encoder_stage_batch_equals_singles(make_case, family, method):
    name, options = method
    prompts = ((0,), (1, 2), (), (3,))  # different images and counts, left padding, one without images
    case = make_case(family, prompts=prompts, text_lens=(5, 14, 9, 20), seed=3)
    model = prune.wrap(case.model, name, keep=0.3, stage="encoder", **options)
    with torch.no_grad():
        batch_inputs = case.inputs()
        out = model.generate(**batch_inputs, **GEN, return_dict_in_generate=True, output_logits=True)
        batch_tokens = out.sequences[:, batch_inputs["input_ids"].shape[1] :]
        batch_kept = model.prune_state.last.keep_mask
        for row in range(len(prompts)):
            single = case.inputs([row])
            o = model.generate(**single, **GEN, return_dict_in_generate=True, output_logits=True)
            assert o.sequences[0, single["input_ids"].shape[1] :].tolist() == batch_tokens[row].tolist()
            torch.testing.assert_close(o.logits[0][0], out.logits[0][row], atol=1e-4, rtol=1e-4)
            length = single["input_ids"].shape[1]
            assert torch.equal(model.prune_state.last.keep_mask[0], batch_kept[row, -length:])


@pytest.mark.parametrize("family", FAMILIES)
def test_encoder_stage_eager_and_sdpa(make_case, family):
    results = []
    for attn in ("eager", "sdpa"):
        case = make_case(family, attn=attn, prompts=((0, 2),), text_lens=(8,))
        model = prune.wrap(case.model, "hiprune", keep=0.25, stage="encoder")
        with torch.no_grad():
            logits = model(**case.inputs()).logits
            tokens = model.generate(**case.inputs(), **GEN)
        results.append((logits, model.prune_state.last.keep_mask, tokens))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-4, rtol=1e-4)
    assert torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[0][2], results[1][2])


def assert_unwrap_restores(model, inputs):
    """Wrapping at the encoder stage adds hooks, a call runs, unwrap removes every hook and the
    logits are bit-identical to the unwrapped model's."""
    hooks = lambda: sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())  # noqa: E731
    with torch.no_grad():
        ref = model(**inputs).logits
    before = hooks()  # transformers installs its own output-capturing hooks at the first call
    with torch.no_grad():
        prune.wrap(model, "hiprune", keep=0.25, stage="encoder")
        assert hooks() > before
        model(**inputs)
        prune.unwrap(model)
        torch.testing.assert_close(model(**inputs).logits, ref, atol=0, rtol=0)
    assert hooks() == before


def test_encoder_stage_unwrap_restores(make_case):
    case = make_case("llava", prompts=((0,),), text_lens=(6,))
    model = case.model
    tower = model.model.vision_tower
    assert_unwrap_restores(model, case.inputs())
    assert "get_image_features" not in model.model.__dict__
    assert tower is model.model.vision_tower


def test_encoder_stage_bad_input(make_case):
    model = make_case("llava").model
    with pytest.raises(ValueError, match="stage"):
        prune.wrap(model, "hiprune", keep=0.25, stage="inside")
    with pytest.raises(ValueError, match="stage"):
        prune.wrap(model, "hiprune", keep=0.25, stage="encoder", exclusion="reference")
    with pytest.raises(TypeError, match="stage"):  # methods without an encoder stage do not take the option
        prune.wrap(model, "random", keep=0.25, stage="encoder")
    assert not hasattr(model, "prune_state")


@pytest.mark.parametrize(
    "build", [tiny_internvl, tiny_gemma3, tiny_llava_onevision],
    ids=["internvl", "gemma3", "llava_onevision"],
)
def test_encoder_stage_refused_where_it_cannot_run(build):
    model = build()
    with pytest.raises(ValueError, match="stage='encoder'"):
        prune.wrap(model, "hiprune", keep=0.25, stage="encoder")
    assert not hasattr(model, "prune_state")
    prune.wrap(model, "hiprune", keep=0.25)  # the default stage still wraps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", METHODS[:2], ids=_ids)
def test_encoder_stage_cuda_oracle_and_batch_equals_singles(make_case, method):
    name, options = method
    case = make_case("llava", attn="sdpa", prompts=((0,), (1, 2), (3,)), text_lens=(5, 14, 20), seed=3)
    model = prune.wrap(case.model.cuda(), name, keep=0.3, stage="encoder", **options)
    to = lambda inputs: {k: v.cuda() for k, v in inputs.items()}  # noqa: E731
    with torch.no_grad():
        batch = to(case.inputs())
        out = model.generate(**batch, **GEN)[:, batch["input_ids"].shape[1] :]
        kept = model.prune_state.last.keep_mask
        for row in range(3):
            single = to(case.inputs([row]))
            tokens = model.generate(**single, **GEN)[0, single["input_ids"].shape[1] :]
            assert tokens.tolist() == out[row].tolist()
            assert torch.equal(model.prune_state.last.keep_mask[0], kept[row, -single["input_ids"].shape[1]:])
        single = to(case.inputs([1]))
        logits = model(**single).logits[0]
        record = model.prune_state.last
    positions = model.prune_state.positions  # the method's preset for LLaVA ("compact"), not "original"
    prune.unwrap(model)
    masks = [im.view_masks()[0] for im in record.images]
    feats = encoder_by_hand(model, single["pixel_values"], [m.cuda() for m in masks], _cut(model, name, options))
    with torch.no_grad():
        embeds = model.get_input_embeddings()(single["input_ids"])[0]
    for im, rows in zip(record.images, feats):
        embeds[im.positions.cuda()[im.kept.cuda()]] = rows
    keep = record.keep_mask[0]
    ref, _ = run_reduced(model, embeds[keep], reduced_positions(keep.cpu(), positions).cuda(), steps=0)
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)


def test_encoder_stage_deepcopy_and_pickle_generate_as_the_original(make_case):
    import copy
    import io

    case = make_case("llava", prompts=((0,), (1,)), text_lens=(6, 9))
    model = prune.wrap(case.model, "hiprune", keep=0.3, stage="encoder")
    buffer = io.BytesIO()
    torch.save(model, buffer)  # before any forward (see test_generate_modes)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    inputs = case.inputs()
    with torch.no_grad():
        ref = model.generate(**inputs, **GEN)
        twin = copy.deepcopy(model)
        for other in (twin, loaded):
            assert other.generate(**inputs, **GEN).tolist() == ref.tolist()
            assert torch.equal(other.prune_state.last.keep_mask, model.prune_state.last.keep_mask)
        prune.unwrap(twin)  # the copy's hooks only
        assert model.generate(**inputs, **GEN).tolist() == ref.tolist()
        assert twin(**inputs).logits.shape[1] == inputs["input_ids"].shape[1]


def test_bench_stages_measure_both_stages_in_one_run(tmp_path):
    import json

    from prune.cli import main

    code = main(
        [
            "bench", "--model", "tiny-llava", "--methods", "hiprune,random", "--keep", "0.25", "--device", "cpu",
            "--stages", "post_encoder,encoder", "--warmup", "0", "--rounds", "1", "--new-tokens", "2",
            "--prompt-tokens", "8", "--out", str(tmp_path), "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    (path,) = tmp_path.glob("*.json")
    result = json.loads(path.read_text())
    rows = {r["method"]: r for r in result["rows"]}
    assert list(rows) == ["none", "hiprune (stage=post_encoder)", "hiprune (stage=encoder)", "random"]
    assert result["settings"]["stages"] == ["post_encoder", "encoder"]
    post, enc = rows["hiprune (stage=post_encoder)"], rows["hiprune (stage=encoder)"]
    assert post["status"] == enc["status"] == "ok"
    assert enc["vision_tokens_after"] == post["vision_tokens_after"] < enc["vision_tokens_before"]
    assert enc["vision_gflops"] < post["vision_gflops"]  # the layers after the cut ran on fewer rows
    assert main(["bench", "--model", "tiny-llava", "--stages", "inside", "--out", str(tmp_path)]) == 2
