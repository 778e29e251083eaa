"""Independent references for the tests: the unwrapped model run on reduced inputs by hand."""

import torch
from transformers import DynamicCache

from prune._compat import with_cache


@torch.no_grad()
def full_inputs_embeds(model, inputs):
    """inputs_embeds the unwrapped model hands its language model (images scattered in)."""
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    if "pixel_values" in inputs:
        kw = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
        feats = model.model.get_image_features(pixel_values=inputs["pixel_values"], **kw).pooler_output
        feats = torch.cat(list(feats), 0)
        mask = (inputs["input_ids"] == model.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, feats)
    return embeds


@torch.no_grad()
def run_reduced(model, embeds, positions, steps=8):
    """Prefill logits and greedy continuation of one unpadded prompt: embeds (L', D), positions (L',)."""
    lm = model.model.language_model
    cache = DynamicCache(config=lm.config)
    out = lm(**with_cache(lm.forward, cache, inputs_embeds=embeds[None], position_ids=positions[None], use_cache=True))
    logits = model.lm_head(out.last_hidden_state)
    prefill = logits[0]
    tokens = []
    pos = int(positions[-1])
    nxt = logits[0, -1].argmax()
    for _ in range(steps):
        tokens.append(int(nxt))
        pos += 1
        e = model.get_input_embeddings()(nxt.view(1, 1))
        out = lm(**with_cache(lm.forward, cache, inputs_embeds=e, position_ids=torch.tensor([[pos]]), use_cache=True))
        nxt = model.lm_head(out.last_hidden_state)[0, -1].argmax()
    return prefill, tokens


def reduced_positions(keep_mask_row, mode):
    length = keep_mask_row.numel()
    if mode == "original":
        return torch.arange(length)[keep_mask_row]
    return torch.arange(int(keep_mask_row.sum()))


@torch.no_grad()
def qwen_full_inputs(model, inputs):
    """(inputs_embeds, M-RoPE position ids (3, B, L)) the unwrapped Qwen model gives its LM."""
    inner = model.model
    ids = inputs["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    if "pixel_values" in inputs:
        feats = torch.cat(list(inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output))
        embeds = embeds.masked_scatter((ids == model.config.image_token_id).unsqueeze(-1), feats)
    if "pixel_values_videos" in inputs:
        feats = torch.cat(
            list(inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]).pooler_output)
        )
        embeds = embeds.masked_scatter((ids == model.config.video_token_id).unsqueeze(-1), feats)
    positions, _ = inner.get_rope_index(
        ids,
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs.get("image_grid_thw"),
        video_grid_thw=inputs.get("video_grid_thw"),
        attention_mask=inputs["attention_mask"],
    )
    return embeds, positions


@torch.no_grad()
def run_reduced_mrope(model, embeds, positions, steps=8, lm=None, prefill_kwargs=None):
    """Prefill logits and greedy tokens of one unpadded prompt: embeds (L', D), positions (3, L').
    Decoding continues at max(prompt positions) + 1 on all three axes, as Qwen's rope_deltas do.
    ``lm`` defaults to ``model.model.language_model``; ``prefill_kwargs`` go to the prefill call only
    (e.g. Qwen3-VL's reduced DeepStack mask and features)."""
    lm = model.model.language_model if lm is None else lm
    device = embeds.device
    cache = DynamicCache(config=lm.config)
    mask = torch.ones(1, embeds.shape[0], dtype=torch.long, device=device)
    out = lm(**with_cache(lm.forward, cache, inputs_embeds=embeds[None], position_ids=positions[:, None],
                          attention_mask=mask, use_cache=True, **(prefill_kwargs or {})))
    logits = model.lm_head(out.last_hidden_state)
    tokens, nxt, pos = [], logits[0, -1].argmax(), int(positions.max())
    for _ in range(steps):
        tokens.append(int(nxt))
        pos += 1
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long, device=device)], 1)
        e = model.get_input_embeddings()(nxt.view(1, 1))
        out = lm(**with_cache(lm.forward, cache, inputs_embeds=e, position_ids=torch.full((3, 1, 1), pos, device=device),
                              attention_mask=mask, use_cache=True))
        nxt = model.lm_head(out.last_hidden_state)[0, -1].argmax()
    return logits[0], tokens


def omni_language_model(thinker):
    """The thinker's text model (transformers 5.17: ``thinker.model``; later: ``thinker.model.language_model``)."""
    inner = thinker.model
    return inner.language_model if hasattr(inner, "language_model") else inner


@torch.no_grad()
def omni_full_inputs(thinker, inputs):
    """(inputs_embeds (B, L, D), TMRoPE position ids (3, B, L)) that the *unwrapped* thinker hands its
    language model for ``inputs``, read with a pre-hook on the language model (no re-implementation)."""
    seen = {}

    def grab(module, args, kwargs):
        seen.setdefault("embeds", kwargs["inputs_embeds"].clone())
        seen.setdefault("positions", kwargs["position_ids"].clone())

    handle = omni_language_model(thinker).register_forward_pre_hook(grab, with_kwargs=True)
    try:
        thinker(**inputs)
    finally:
        handle.remove()
    positions = seen["positions"]
    return seen["embeds"], positions[-3:] if positions.ndim == 3 else positions


def run_reduced_omni(thinker, embeds, positions, steps=8):
    """:func:`run_reduced_mrope` on the thinker's language model."""
    return run_reduced_mrope(thinker, embeds, positions, steps, lm=omni_language_model(thinker))


@torch.no_grad()
def qwen3_full_inputs(model, inputs):
    """What the *unwrapped* Qwen3-VL hands its language model for ``inputs``, read with a pre-hook:
    inputs_embeds (B, L, D), M-RoPE position ids (3, B, L), DeepStack's visual mask (B, L) (None
    without media) and its list of (n_visual, D) features."""
    seen = {}

    def grab(module, args, kwargs):
        if "embeds" not in seen:
            seen.update(embeds=kwargs["inputs_embeds"].clone(), positions=kwargs["position_ids"].clone(),
                        visual=kwargs.get("visual_pos_masks"), deepstack=kwargs.get("deepstack_visual_embeds"))

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return seen["embeds"], seen["positions"][-3:], seen["visual"], seen["deepstack"]


def reduce_deepstack(visual, deepstack, keep):
    """One prompt's DeepStack arguments for the rows ``keep`` (L,) bool of an unpadded prompt: the
    reduced (1, L') mask and every feature tensor without the rows of dropped visual tokens."""
    visual = visual[0]
    kept_visual = keep[visual]
    return {"visual_pos_masks": visual[keep][None], "deepstack_visual_embeds": [d[kept_visual] for d in deepstack]}
