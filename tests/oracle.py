"""Independent references for the tests: the unwrapped model run on reduced inputs by hand."""

import torch
from transformers import DynamicCache


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
    out = lm(inputs_embeds=embeds[None], position_ids=positions[None], past_key_values=cache, use_cache=True)
    logits = model.lm_head(out.last_hidden_state)
    prefill = logits[0]
    tokens = []
    pos = int(positions[-1])
    nxt = logits[0, -1].argmax()
    for _ in range(steps):
        tokens.append(int(nxt))
        pos += 1
        e = model.get_input_embeddings()(nxt.view(1, 1))
        out = lm(inputs_embeds=e, position_ids=torch.tensor([[pos]]), past_key_values=cache, use_cache=True)
        nxt = model.lm_head(out.last_hidden_state)[0, -1].argmax()
    return prefill, tokens


def reduced_positions(keep_mask_row, mode):
    length = keep_mask_row.numel()
    if mode == "original":
        return torch.arange(length)[keep_mask_row]
    return torch.arange(int(keep_mask_row.sum()))
