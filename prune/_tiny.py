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


# ---- Qwen2-VL / Qwen2.5-VL -------------------------------------------------------------------
QWEN_VOCAB = 160
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 150, 151, 152, 153
QWEN_PATCH, QWEN_TEMPORAL, QWEN_MERGE = 4, 2, 2


def tiny_qwen_vl(
    version: str = "2.5", *, attn_implementation: str = "eager", depth: int = 4, patch: int = QWEN_PATCH, seed: int = 0
):
    """A Qwen2-VL / Qwen2.5-VL-shaped model: 4-pixel patches, 2x2 merge, M-RoPE text model.

    Qwen2.5: windows of 2x2 merged tokens, full attention at blocks 1 and 3 (of 4)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": QWEN_VOCAB,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
        "pad_token_id": PAD_TOKEN,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    ids = {
        "image_token_id": QWEN_IMAGE,
        "video_token_id": QWEN_VIDEO,
        "vision_start_token_id": QWEN_START,
        "vision_end_token_id": QWEN_END,
    }
    vision = {
        "depth": depth,
        "num_heads": 4,
        "patch_size": patch,
        "temporal_patch_size": QWEN_TEMPORAL,
        "spatial_merge_size": QWEN_MERGE,
        "in_channels": 3,
    }
    if version == "2.5":
        vision.update(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=patch * QWEN_MERGE * 2,
                      fullatt_block_indexes=[1, 3], tokens_per_second=2)
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        cls = Qwen2_5_VLForConditionalGeneration
    elif version == "2":
        vision.update(embed_dim=32, hidden_size=64, mlp_ratio=2)
        config = Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
        cls = Qwen2VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    config._attn_implementation = attn_implementation
    model = cls(config)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()


def qwen_media(grids: list[tuple[int, int, int]], *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened patches (sum t*h*w, 3*2*4*4) and grid_thw for items of (t, h, w) patch grids."""
    gen = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    dim = 3 * QWEN_TEMPORAL * QWEN_PATCH * QWEN_PATCH
    return torch.randn(n, dim, generator=gen), torch.tensor(grids, dtype=torch.long)


def qwen_prompts(
    items_per_prompt: list[list[tuple[str, tuple[int, int, int]]]], text_lens: list[int], *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and mm_token_type_ids (left padded) with
    <vision_start> pad * n <vision_end> around each ("image" | "video", (t, h, w)) item."""
    gen = torch.Generator().manual_seed(seed)
    rows, types = [], []
    for items, n_text in zip(items_per_prompt, text_lens):
        pieces = len(items) + 1
        cuts = [n_text * i // pieces for i in range(pieces + 1)]
        row, typ = [1], [0]
        for i in range(pieces):
            words = torch.randint(3, 140, (cuts[i + 1] - cuts[i],), generator=gen).tolist()
            row += words
            typ += [0] * len(words)
            if i < len(items):
                kind, (t, h, w) = items[i]
                n = t * h * w // (QWEN_MERGE * QWEN_MERGE)
                token = QWEN_IMAGE if kind == "image" else QWEN_VIDEO
                row += [QWEN_START] + [token] * n + [QWEN_END]
                typ += [0] + [1 if kind == "image" else 2] * n + [0]
        rows.append(row)
        types.append(typ)
    length = max(len(r) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), length), PAD_TOKEN, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
        "mm_token_type_ids": torch.zeros(len(rows), length, dtype=torch.long),
    }
    for b, (row, typ) in enumerate(zip(rows, types)):
        out["input_ids"][b, length - len(row) :] = torch.tensor(row)
        out["attention_mask"][b, length - len(row) :] = 1
        out["mm_token_type_ids"][b, length - len(row) :] = torch.tensor(typ)
    return out


# ---- LLaVA-OneVision ---------------------------------------------------------------------------
OV_IMAGE, OV_VIDEO = 120, 121


def tiny_llava_onevision(
    *, image_size: int = 24, patch: int = 4, aspect: str = "anyres_max_9", attn_implementation: str = "eager", seed: int = 0
):
    """A LLaVA-OneVision-shaped model: SigLIP (no [CLS]) 6x6 patches per crop, Qwen2 decoder."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    torch.manual_seed(seed)
    s = image_size
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                image_size=s, patch_size=patch)
    text = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB, "max_position_embeddings": 4096,
            "pad_token_id": PAD_TOKEN, "bos_token_id": 1, "eos_token_id": 2}
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=OV_IMAGE,
        video_token_id=OV_VIDEO,
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect,
    )
    config._attn_implementation = attn_implementation
    model = LlavaOnevisionForConditionalGeneration(config)
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()
