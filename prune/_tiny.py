"""Tiny random LLaVA models and inputs built in code (no downloads), for tests and the demo."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

IMAGE_TOKEN = 120
PAD_TOKEN = 0
VOCAB = 128


def _vision(image_size: int, patch: int, layers: int, hidden: int) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        projection_dim=hidden,
    )


def _text(hidden: int, layers: int) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=4096,
        pad_token_id=PAD_TOKEN,
        bos_token_id=1,
        eos_token_id=2,
    )


def tiny_llava(
    *,
    image_size: int = 32,
    patch: int = 4,
    vision_layers: int = 4,
    vision_hidden: int = 32,
    text_hidden: int = 64,
    text_layers: int = 2,
    attn_implementation: str = "eager",
    seed: int = 0,
) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model: CLIP encoder with [CLS], features from layer -2, Llama decoder."""
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_vision(image_size, patch, vision_layers, vision_hidden),
        text_config=_text(text_hidden, text_layers),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()


def tiny_llava_next(
    *,
    image_size: int = 16,
    patch: int = 4,
    vision_layers: int = 4,
    attn_implementation: str = "eager",
    seed: int = 0,
) -> LlavaNextForConditionalGeneration:
    """A LLaVA-NeXT-shaped model: anyres with pinpoints up to 2x2 crops, image_newline tokens."""
    torch.manual_seed(seed)
    s = image_size
    config = LlavaNextConfig(
        vision_config=_vision(image_size, patch, vision_layers, 32),
        text_config=_text(64, 2),
        image_token_id=IMAGE_TOKEN,
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    config._attn_implementation = attn_implementation
    model = LlavaNextForConditionalGeneration(config)
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()


def image_token_counts(
    model, pixel_values: torch.Tensor, image_sizes: torch.Tensor | None = None
) -> list[int]:
    """Placeholder tokens each image needs (what a processor would insert)."""
    if image_sizes is None:
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        return [side * side] * pixel_values.shape[0]
    with torch.no_grad():
        feats = model.model.get_image_features(
            pixel_values=pixel_values, image_sizes=image_sizes
        ).pooler_output
    return [f.shape[0] for f in feats]


def build_prompts(
    counts_per_prompt: list[list[int]], text_lens: list[int], *, seed: int = 0, pad_left: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask for prompts of random text with image placeholders.

    counts_per_prompt[b]: the placeholder counts of prompt b's images (in order); text_lens[b]: text
    tokens of prompt b, split around the images. Left padding with PAD_TOKEN.
    """
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for counts, n_text in zip(counts_per_prompt, text_lens):
        pieces = max(1, len(counts) + 1)
        cuts = [n_text * i // pieces for i in range(pieces + 1)]
        row = [1]
        for i in range(pieces):
            row += torch.randint(3, IMAGE_TOKEN - 1, (cuts[i + 1] - cuts[i],), generator=gen).tolist()
            if i < len(counts):
                row += [IMAGE_TOKEN] * counts[i]
        rows.append(row)
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        if pad_left:
            ids[b, length - len(row) :] = torch.tensor(row)
            mask[b, length - len(row) :] = 1
        else:
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = 1
    return ids, mask
