"""Tiny random LLaVA models and inputs built in code (no downloads), for tests and the demo."""

from __future__ import annotations

import torch
from transformers import (
    CLIPVisionConfig,
    Dinov2Config,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

IMAGE_TOKEN = 120
PAD_TOKEN = 0
VOCAB = 128


def _vision(image_size: int, patch: int, layers: int, hidden: int, kind: str = "clip"):
    """A CLIP vision config, or (``kind="dinov2"``) a DINOv2 one of the same size."""
    config_cls, extra = (
        (CLIPVisionConfig, {"projection_dim": hidden}) if kind == "clip" else (Dinov2Config, {"layerscale_value": 1.0})
    )
    return config_cls(
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=patch,
        **extra,
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
    vision: str = "clip",
) -> LlavaForConditionalGeneration:
    """A LLaVA-1.5-shaped model: CLIP encoder with [CLS], features from layer -2, Llama decoder.
    ``vision="dinov2"``: a DINOv2 encoder (as the proxy VLM's), features from the last layer."""
    if vision not in ("clip", "dinov2"):
        raise ValueError(f"vision must be 'clip' or 'dinov2', got {vision!r}")
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=_vision(image_size, patch, vision_layers, vision_hidden, kind=vision),
        text_config=_text(text_hidden, text_layers),
        image_token_id=IMAGE_TOKEN,
        vision_feature_layer=-2 if vision == "clip" else -1,
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
    text_layers: int = 2,
    attn_implementation: str = "eager",
    seed: int = 0,
) -> LlavaNextForConditionalGeneration:
    """A LLaVA-NeXT-shaped model: anyres with pinpoints up to 2x2 crops, image_newline tokens."""
    torch.manual_seed(seed)
    s = image_size
    config = LlavaNextConfig(
        vision_config=_vision(image_size, patch, vision_layers, 32),
        text_config=_text(64, text_layers),
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
    version: str = "2.5",
    *,
    attn_implementation: str = "eager",
    depth: int = 4,
    patch: int = QWEN_PATCH,
    text_layers: int = 2,
    seed: int = 0,
    fullatt: list[int] | None = None,
):
    """A Qwen2-VL / Qwen2.5-VL-shaped model: 4-pixel patches, 2x2 merge, M-RoPE text model.

    Qwen2.5: windows of 2x2 merged tokens, full attention at blocks ``fullatt`` (default 1 and 3 of
    4; the 7B's layout is ``depth=32, fullatt=[7, 15, 23, 31]``)."""
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
        "num_hidden_layers": text_layers,
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
                      fullatt_block_indexes=fullatt or [1, 3], tokens_per_second=2)
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
    return _left_padded(rows, types)


def _left_padded(rows: list[list[int]], types: list[list[int]]) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask and mm_token_type_ids (B, L) of token rows, padded on the left."""
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


# ---- Qwen2.5-Omni thinker ----------------------------------------------------------------------
OMNI_VOCAB = 200
OMNI_AUDIO, OMNI_IMAGE, OMNI_VIDEO = 190, 191, 192
OMNI_AUDIO_START, OMNI_AUDIO_END, OMNI_VISION_START, OMNI_VISION_END = 193, 194, 195, 196
OMNI_MEL = 16  # mel bins of the tiny audio encoder
OMNI_PPS, OMNI_CHUNK_SECONDS = 25, 2  # TMRoPE: position ids per second, seconds per interleaved chunk


def _omni_thinker_config(attn_implementation: str, depth: int):
    from transformers import Qwen2_5OmniThinkerConfig

    config = Qwen2_5OmniThinkerConfig(
        audio_config={"num_mel_bins": OMNI_MEL, "encoder_layers": 2, "encoder_attention_heads": 2,
                      "encoder_ffn_dim": 64, "d_model": 32, "output_dim": 64, "n_window": 50,
                      "max_source_positions": 64},
        vision_config={"depth": depth, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4,
                       "patch_size": QWEN_PATCH, "spatial_merge_size": QWEN_MERGE, "temporal_patch_size": QWEN_TEMPORAL,
                       "window_size": QWEN_PATCH * QWEN_MERGE * 2, "out_hidden_size": 64,
                       "fullatt_block_indexes": [1, 3]},
        text_config={"vocab_size": OMNI_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 4096,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                     "pad_token_id": PAD_TOKEN, "bos_token_id": 1, "eos_token_id": 2},
        audio_token_index=OMNI_AUDIO,
        image_token_index=OMNI_IMAGE,
        video_token_index=OMNI_VIDEO,
        audio_start_token_id=OMNI_AUDIO_START,
        audio_end_token_id=OMNI_AUDIO_END,
        vision_start_token_id=OMNI_VISION_START,
        vision_end_token_id=OMNI_VISION_END,
        position_id_per_seconds=OMNI_PPS,
        seconds_per_chunk=OMNI_CHUNK_SECONDS,
    )
    config._attn_implementation = attn_implementation
    for sub in ("audio_config", "vision_config", "text_config"):
        getattr(config, sub)._attn_implementation = attn_implementation
    return config


def tiny_omni_thinker(*, attn_implementation: str = "eager", depth: int = 4, seed: int = 0):
    """A Qwen2.5-Omni-shaped thinker: Whisper-style audio encoder (16 mel bins, 2 layers, 25 tokens
    per second), Qwen2.5-VL ViT (4-pixel patches, 2x2 merge, windows, full attention at blocks 1 and 3),
    2-layer text model with TMRoPE (25 position ids per second, 2-second chunks)."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2_5OmniThinkerForConditionalGeneration(_omni_thinker_config(attn_implementation, depth))
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()


def tiny_omni(*, attn_implementation: str = "eager", seed: int = 0, talker: bool = False):
    """A full Qwen2_5OmniForConditionalGeneration around :func:`tiny_omni_thinker`'s thinker. With
    ``talker=True`` a tiny talker and token2wav are built too (speech output); a speaker "Chelsie" is
    registered either way so that ``generate`` runs without a downloaded speaker file."""
    from transformers import Qwen2_5OmniConfig, Qwen2_5OmniForConditionalGeneration

    torch.manual_seed(seed)
    thinker = _omni_thinker_config(attn_implementation, 4)
    talker_config = {"vocab_size": 64, "embedding_size": 64, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
                     "audio_token_index": OMNI_AUDIO, "image_token_index": OMNI_IMAGE, "video_token_index": OMNI_VIDEO,
                     "vision_start_token_id": OMNI_VISION_START, "vision_end_token_id": OMNI_VISION_END,
                     "audio_start_token_id": OMNI_AUDIO_START, "audio_end_token_id": OMNI_AUDIO_END,
                     "tts_codec_start_token_id": 60, "tts_codec_end_token_id": 61, "tts_codec_pad_token_id": 62,
                     "tts_codec_mask_token_id": 63, "tts_text_start_token_id": 180, "tts_text_end_token_id": 181,
                     "tts_text_pad_token_id": 182,
                     "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    token2wav = {  # a tiny DiT + BigVGAN: built, never run by the tests (speech is refused when pruned)
        "dit_config": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "head_dim": 16,
                       "emb_dim": 16, "num_embeds": 64, "mel_dim": 8, "enc_emb_dim": 8, "enc_dim": 16,
                       "enc_channels": [16, 16, 16, 16, 48], "enc_attention_channels": 8, "enc_se_channels": 8,
                       "look_ahead_layers": [1], "look_backward_layers": [0], "block_size": 4},
        "bigvgan_config": {"mel_dim": 8, "upsample_initial_channel": 16, "upsample_rates": [2, 2],
                           "upsample_kernel_sizes": [4, 4], "resblock_kernel_sizes": [3],
                           "resblock_dilation_sizes": [[1, 3, 5]]},
    }
    config = Qwen2_5OmniConfig(thinker_config=thinker.to_dict(), talker_config=talker_config,
                               token2wav_config=token2wav, enable_audio_output=talker)
    config._attn_implementation = attn_implementation
    model = Qwen2_5OmniForConditionalGeneration(config)
    model.thinker.generation_config.pad_token_id = PAD_TOKEN
    model.speaker_map = {"Chelsie": {"bos_token": 183, "cond": torch.zeros(1, 8), "ref_mel": torch.zeros(1, 8, 8)}}
    return model.eval()


def omni_audio_tokens(frames: int) -> int:
    """LLM tokens of an audio clip of ``frames`` mel frames (100 per second): 25 per second."""
    after_conv = (frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def omni_video_times(grid: tuple[int, int, int], second_per_grid: float) -> torch.Tensor:
    """TMRoPE temporal index of each merged video token, in token order (what ``get_rope_index``
    computes: temporal slice s sits at ``int(s * second_per_grid * 25)``)."""
    t, h, w = grid
    per_slice = (h // QWEN_MERGE) * (w // QWEN_MERGE)
    times = (torch.arange(t) * torch.tensor(float(second_per_grid)) * OMNI_PPS).long()
    return times.repeat_interleave(per_slice)


def _chunk_sizes(times: list[int], per_chunk: int) -> list[int]:
    """Tokens of each consecutive 2-second chunk (the processor's ``get_chunked_index``)."""
    sizes, chunk = [0], 1
    for value in times:
        while value >= chunk * per_chunk:
            sizes.append(0)
            chunk += 1
        sizes[-1] += 1
    return sizes


def omni_item_tokens(item: tuple) -> list[int]:
    """Token ids one item puts in the prompt, as Qwen2_5OmniProcessor lays it out.

    item: ("image", (1, h, w)) | ("video", (t, h, w), second_per_grid) | ("audio", mel_frames)
        | ("video+audio", (t, h, w), second_per_grid, mel_frames)  (``use_audio_in_video=True``:
        <vision_bos><audio_bos> then per 2-second chunk its video tokens and its audio tokens,
        <audio_eos><vision_eos>).
    """
    kind = item[0]
    if kind == "image":
        t, h, w = item[1]
        return [OMNI_VISION_START] + [OMNI_IMAGE] * (t * h * w // QWEN_MERGE**2) + [OMNI_VISION_END]
    if kind == "video":
        t, h, w = item[1]
        return [OMNI_VISION_START] + [OMNI_VIDEO] * (t * h * w // QWEN_MERGE**2) + [OMNI_VISION_END]
    if kind == "audio":
        return [OMNI_AUDIO_START] + [OMNI_AUDIO] * omni_audio_tokens(item[1]) + [OMNI_AUDIO_END]
    if kind == "video+audio":
        per_chunk = OMNI_PPS * OMNI_CHUNK_SECONDS
        video = _chunk_sizes(omni_video_times(item[1], item[2]).tolist(), per_chunk)
        audio = _chunk_sizes(list(range(omni_audio_tokens(item[3]))), per_chunk)
        row = [OMNI_VISION_START, OMNI_AUDIO_START]
        for j in range(max(len(video), len(audio))):
            row += [OMNI_VIDEO] * (video[j] if j < len(video) else 0)
            row += [OMNI_AUDIO] * (audio[j] if j < len(audio) else 0)
        return row + [OMNI_AUDIO_END, OMNI_VISION_END]
    raise ValueError(f"unknown item kind {kind!r}")


def omni_inputs(items_per_prompt: list[list[tuple]], text_lens: list[int], *, seed: int = 0) -> dict:
    """Thinker inputs for a batch (left padded): input_ids, attention_mask and the media tensors
    (pixel_values / image_grid_thw, pixel_values_videos / video_grid_thw / video_second_per_grid,
    input_features (n_audio, 16, frames) / feature_attention_mask), use_audio_in_video. Media of each
    kind are in prompt order; a "video+audio" item's audio track takes its place among the audios.
    A batch cannot mix "video" and "video+audio" items (the model's ``use_audio_in_video`` is one flag).
    """
    kinds = {item[0] for items in items_per_prompt for item in items}
    if {"video", "video+audio"} <= kinds:
        raise ValueError("a batch cannot mix plain videos and videos with their audio track")
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for items, n_text in zip(items_per_prompt, text_lens):
        pieces = len(items) + 1
        cuts = [n_text * i // pieces for i in range(pieces + 1)]
        row = [1]
        for i in range(pieces):
            row += torch.randint(3, 150, (cuts[i + 1] - cuts[i],), generator=gen).tolist()
            if i < len(items):
                row += omni_item_tokens(items[i])
        rows.append(row)
    length = max(len(r) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), length), PAD_TOKEN, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
    }
    for b, row in enumerate(rows):
        out["input_ids"][b, length - len(row) :] = torch.tensor(row)
        out["attention_mask"][b, length - len(row) :] = 1
    flat = [item for items in items_per_prompt for item in items]
    images = [item[1] for item in flat if item[0] == "image"]
    videos = [item for item in flat if item[0] in ("video", "video+audio")]
    audios = [item[1] if item[0] == "audio" else item[3] for item in flat if item[0] in ("audio", "video+audio")]
    if images:
        out["pixel_values"], out["image_grid_thw"] = qwen_media(images, seed=seed + 1)
    if videos:
        out["pixel_values_videos"], out["video_grid_thw"] = qwen_media([v[1] for v in videos], seed=seed + 2)
        out["video_second_per_grid"] = torch.tensor([float(v[2]) for v in videos])
    if audios:
        frames = max(audios)
        out["input_features"] = torch.randn(len(audios), OMNI_MEL, frames, generator=gen)
        out["feature_attention_mask"] = (torch.arange(frames)[None] < torch.tensor(audios)[:, None]).long()
        out["input_features"] *= out["feature_attention_mask"][:, None]
    out["use_audio_in_video"] = "video+audio" in kinds
    return out


_OMNI_SPECIAL = {
    "audio_token": ("<|AUDIO|>", OMNI_AUDIO),
    "image_token": ("<|IMAGE|>", OMNI_IMAGE),
    "video_token": ("<|VIDEO|>", OMNI_VIDEO),
    "audio_bos_token": ("<|audio_bos|>", OMNI_AUDIO_START),
    "audio_eos_token": ("<|audio_eos|>", OMNI_AUDIO_END),
    "vision_bos_token": ("<|vision_bos|>", OMNI_VISION_START),
    "vision_eos_token": ("<|vision_eos|>", OMNI_VISION_END),
}
OMNI_VIDEO_SIZE = {"shortest_edge": 16 * 16, "longest_edge": 32 * 48}  # pixels per frame (tiny grids)


def tiny_omni_processor():
    """A Qwen2_5OmniProcessor for :func:`tiny_omni_thinker`, built offline: a word-level tokenizer
    (``w3`` ... ``w189`` are words 3..189; the Omni special tokens have the thinker's ids), a
    16-mel Whisper feature extractor, Qwen2-VL image / video processors with 4-pixel patches.
    Call it through :func:`omni_process` (the processor's audio-in-video arguments differ between
    transformers releases)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2_5OmniProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
        WhisperFeatureExtractor,
    )

    vocab = {"<pad>": PAD_TOKEN, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, OMNI_AUDIO)})
    vocab.update({token: i for token, i in _OMNI_SPECIAL.values()})
    vocab.update({f"x{i}": i for i in range(OMNI_VISION_END + 1, OMNI_VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        extra_special_tokens={name: token for name, (token, _) in _OMNI_SPECIAL.items()},
    )
    tokenizer.padding_side = "left"
    return Qwen2_5OmniProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL,
                                              merge_size=QWEN_MERGE, size=OMNI_VIDEO_SIZE),
        video_processor=Qwen2VLVideoProcessor(patch_size=QWEN_PATCH, temporal_patch_size=QWEN_TEMPORAL,
                                              merge_size=QWEN_MERGE, size=OMNI_VIDEO_SIZE),
        feature_extractor=WhisperFeatureExtractor(feature_size=OMNI_MEL, sampling_rate=16000),
        tokenizer=tokenizer,
    )


def omni_process(processor, text, *, videos=None, audio=None, images=None, use_audio_in_video=False,
                 fps: float = 2.0) -> dict:
    """Run the Omni processor the same way on every transformers release.

    text: a str or list of str with ``<|vision_bos|><|VIDEO|><|vision_eos|>``,
    ``<|audio_bos|><|AUDIO|><|audio_eos|>`` and ``<|vision_bos|><|IMAGE|><|vision_eos|>`` where the
    media go; videos: (T, H, W, 3) uint8 frames already sampled at ``fps``; audio: mono float32 16 kHz
    waveforms, in prompt order (with ``use_audio_in_video=True`` the i-th video's track is audio[i]
    and no other audio may be given). Returns the model inputs with ``use_audio_in_video``.
    """
    kwargs = {"return_tensors": "pt", "padding": True,
              "videos_kwargs": {"size": OMNI_VIDEO_SIZE, "do_sample_frames": False, "fps": fps},
              "images_kwargs": {"size": OMNI_VIDEO_SIZE}}
    if use_audio_in_video and videos:
        if hasattr(processor, "load_audio_from_video"):  # transformers >= 5.2x: OmniModalProcessorMixin
            kwargs.update(load_audio_from_video=True, audio_from_video_indices=list(range(len(videos))))
        else:  # 5.17: the audio list is consumed by videos and audio placeholders in prompt order
            kwargs["use_audio_in_video"] = True
    out = processor(text=text, videos=videos, audio=audio, images=images, **kwargs)
    out = {k: v for k, v in out.items() if k != "num_audio_tokens"}
    out["use_audio_in_video"] = bool(use_audio_in_video and videos)
    return out


# ---- Qwen3-VL (dense and MoE) -------------------------------------------------------------------
QWEN3_TIMESTAMP = 3  # timestamp text tokens before each temporal slice of a video ("<t seconds>")


def tiny_qwen3_vl(
    *,
    moe: bool = False,
    attn_implementation: str = "eager",
    depth: int = 4,
    deepstack: tuple[int, ...] = (1, 2),
    text_layers: int = 2,
    seed: int = 0,
):
    """A Qwen3-VL-shaped model: 4-pixel patches, 2x2 merge, a learned 4x4 position grid, DeepStack
    mergers after vision blocks ``deepstack`` (their features are added after the first
    ``len(deepstack)`` decoder layers), interleaved M-RoPE text model (mrope_section [2, 3, 3]).
    ``moe=True``: the MoE text model (4 experts, 2 per token)."""
    from transformers import (
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
    )

    torch.manual_seed(seed)
    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": text_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": QWEN_VOCAB,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True,
                            "rope_theta": 10000.0},
        "pad_token_id": PAD_TOKEN,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    if moe:
        text.update(moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
    vision = {
        "depth": depth,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "patch_size": QWEN_PATCH,
        "temporal_patch_size": QWEN_TEMPORAL,
        "spatial_merge_size": QWEN_MERGE,
        "in_channels": 3,
        "out_hidden_size": 64,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": list(deepstack),
    }
    ids = {
        "image_token_id": QWEN_IMAGE,
        "video_token_id": QWEN_VIDEO,
        "vision_start_token_id": QWEN_START,
        "vision_end_token_id": QWEN_END,
    }
    config_cls, cls = (Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration) if moe else (
        Qwen3VLConfig, Qwen3VLForConditionalGeneration)
    config = config_cls(vision_config=vision, text_config=text, **ids)
    config._attn_implementation = attn_implementation
    for sub in ("vision_config", "text_config"):
        getattr(config, sub)._attn_implementation = attn_implementation
    model = cls(config)
    if moe:  # transformers initialises the experts' weights to zeros on some releases: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "experts" in name and p.abs().sum() == 0:
                    p.normal_(0, 0.02)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()


def qwen3_prompts(
    items_per_prompt: list[list[tuple[str, tuple[int, int, int]]]], text_lens: list[int], *, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Like :func:`qwen_prompts`, laid out as Qwen3VLProcessor does: a video's temporal slices are
    separated by timestamp text, ``<t> <vision_start> slice tokens <vision_end>`` per slice."""
    gen = torch.Generator().manual_seed(seed)
    rows, types = [], []
    per_slice = QWEN_MERGE * QWEN_MERGE
    for items, n_text in zip(items_per_prompt, text_lens):
        pieces = len(items) + 1
        cuts = [n_text * i // pieces for i in range(pieces + 1)]
        row, typ = [1], [0]
        for i in range(pieces):
            words = torch.randint(3, 140, (cuts[i + 1] - cuts[i],), generator=gen).tolist()
            row += words
            typ += [0] * len(words)
            if i >= len(items):
                continue
            kind, (t, h, w) = items[i]
            if kind == "image":
                n = t * h * w // per_slice
                row += [QWEN_START] + [QWEN_IMAGE] * n + [QWEN_END]
                typ += [0] + [1] * n + [0]
                continue
            n = h * w // per_slice
            for _ in range(t):
                stamp = torch.randint(3, 140, (QWEN3_TIMESTAMP,), generator=gen).tolist()
                row += stamp + [QWEN_START] + [QWEN_VIDEO] * n + [QWEN_END]
                typ += [0] * QWEN3_TIMESTAMP + [0] + [2] * n + [0]
        rows.append(row)
        types.append(typ)
    return _left_padded(rows, types)


# ---- Gemma 3 -----------------------------------------------------------------------------------
GEMMA_IMAGE, GEMMA_BOI, GEMMA_EOI = 150, 152, 153
GEMMA_IMAGE_SIZE, GEMMA_PATCH, GEMMA_TOKENS = 32, 2, 16  # 16x16 patches pooled 4x4 -> 4x4 = 16 tokens


def tiny_gemma3(*, attn_implementation: str = "eager", text_layers: int = 4, sliding_window: int = 8, seed: int = 0):
    """A Gemma-3-shaped model: SigLIP without [CLS] (32 px, 2 px patches: 16x16 patches), the 4x4
    average pool of the projector (16 tokens per image), a Gemma 3 text model whose layers alternate
    sliding-window (``sliding_window`` tokens) and full attention, image tokens bidirectional
    through ``token_type_ids``."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 4, "num_attention_heads": 4, "image_size": GEMMA_IMAGE_SIZE,
              "patch_size": GEMMA_PATCH, "vision_use_head": False}
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": text_layers, "num_attention_heads": 4,
            "num_key_value_heads": 2, "head_dim": 16, "vocab_size": QWEN_VOCAB, "max_position_embeddings": 4096,
            "sliding_window": sliding_window, "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(text_layers)],
            "pad_token_id": PAD_TOKEN, "bos_token_id": 1, "eos_token_id": 2}
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=GEMMA_TOKENS,
                          image_token_index=GEMMA_IMAGE, boi_token_index=GEMMA_BOI, eoi_token_index=GEMMA_EOI)
    config._attn_implementation = attn_implementation
    for sub in ("vision_config", "text_config"):
        getattr(config, sub)._attn_implementation = attn_implementation
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # transformers initialises the projection to zeros: images would not matter
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()


def gemma3_inputs(images_per_prompt: list[int], text_lens: list[int], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask, token_type_ids (left padded) and pixel_values for prompts with
    ``<boi> image * 16 <eoi>`` per image (a pan-and-scan crop is one more such image)."""
    gen = torch.Generator().manual_seed(seed)
    rows, types = [], []
    for n_images, n_text in zip(images_per_prompt, text_lens):
        pieces = n_images + 1
        cuts = [n_text * i // pieces for i in range(pieces + 1)]
        row, typ = [1], [0]
        for i in range(pieces):
            words = torch.randint(3, 140, (cuts[i + 1] - cuts[i],), generator=gen).tolist()
            row += words
            typ += [0] * len(words)
            if i < n_images:
                row += [GEMMA_BOI] + [GEMMA_IMAGE] * GEMMA_TOKENS + [GEMMA_EOI]
                typ += [0] + [1] * GEMMA_TOKENS + [0]
        rows.append(row)
        types.append(typ)
    length = max(len(r) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), length), PAD_TOKEN, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
        "token_type_ids": torch.zeros(len(rows), length, dtype=torch.long),
    }
    for b, (row, typ) in enumerate(zip(rows, types)):
        out["input_ids"][b, length - len(row) :] = torch.tensor(row)
        out["attention_mask"][b, length - len(row) :] = 1
        out["token_type_ids"][b, length - len(row) :] = torch.tensor(typ)
    if sum(images_per_prompt):
        size = GEMMA_IMAGE_SIZE
        out["pixel_values"] = torch.randn(sum(images_per_prompt), 3, size, size, generator=gen)
    return out


# ---- InternVL ----------------------------------------------------------------------------------
INTERNVL_IMAGE, INTERNVL_START, INTERNVL_END = 150, 152, 153
INTERNVL_TILE, INTERNVL_PATCH = 16, 2  # 8x8 patches per tile, pixel shuffle 2x2 -> 4x4 = 16 tokens
INTERNVL_TOKENS = 16


def tiny_internvl(*, attn_implementation: str = "eager", text_layers: int = 2, seed: int = 0):
    """An InternVL-3-shaped model: InternViT with [CLS] (16 px tiles, 2 px patches: 8x8 patches),
    features of the last layer without [CLS], pixel shuffle (2x2 -> 1 token, 16 per tile), MLP
    projector, Qwen2 decoder."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4,
              "image_size": [INTERNVL_TILE, INTERNVL_TILE], "patch_size": [INTERNVL_PATCH, INTERNVL_PATCH],
              "use_mean_pooling": False}
    text = {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": text_layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": QWEN_VOCAB,
            "max_position_embeddings": 4096, "pad_token_id": PAD_TOKEN, "bos_token_id": 1, "eos_token_id": 2}
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=INTERNVL_IMAGE,
                            image_seq_length=INTERNVL_TOKENS, downsample_ratio=0.5, vision_feature_layer=-1,
                            vision_feature_select_strategy="default")
    config._attn_implementation = attn_implementation
    for sub in ("vision_config", "text_config"):
        getattr(config, sub)._attn_implementation = attn_implementation
    model = InternVLForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()


def internvl_inputs(tiles_per_image: list[list[int]], text_lens: list[int], *, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids, attention_mask (left padded) and pixel_values (all tiles, prompt order) for prompts
    whose images have the given tile counts (dynamic tiles plus the thumbnail, as the processor lays
    them out: ``<img> context * 16 * tiles </img>``)."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for tiles, n_text in zip(tiles_per_image, text_lens):
        pieces = len(tiles) + 1
        cuts = [n_text * i // pieces for i in range(pieces + 1)]
        row = [1]
        for i in range(pieces):
            row += torch.randint(3, 140, (cuts[i + 1] - cuts[i],), generator=gen).tolist()
            if i < len(tiles):
                row += [INTERNVL_START] + [INTERNVL_IMAGE] * (INTERNVL_TOKENS * tiles[i]) + [INTERNVL_END]
        rows.append(row)
    length = max(len(r) for r in rows)
    out = {
        "input_ids": torch.full((len(rows), length), PAD_TOKEN, dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
    }
    for b, row in enumerate(rows):
        out["input_ids"][b, length - len(row) :] = torch.tensor(row)
        out["attention_mask"][b, length - len(row) :] = 1
    total = sum(sum(t) for t in tiles_per_image)
    if total:
        out["pixel_values"] = torch.randn(total, 3, INTERNVL_TILE, INTERNVL_TILE, generator=gen)
    return out


# ---- Qwen3.5 -----------------------------------------------------------------------------------
def tiny_qwen3_5(*, attn_implementation: str = "eager", depth: int = 4, text_layers: int = 4, seed: int = 0):
    """A Qwen3.5-shaped model: Qwen3-VL's ViT layout (4-pixel patches, 2x2 merge, no DeepStack) and a
    language model whose layers alternate gated-DeltaNet linear attention and full attention
    (``layer_types``), interleaved M-RoPE on a quarter of each head (partial_rotary_factor 0.25)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    torch.manual_seed(seed)
    text = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": text_layers,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "vocab_size": QWEN_VOCAB,
            "max_position_embeddings": 4096, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 16,
            "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
            "layer_types": ["linear_attention" if i % 2 == 0 else "full_attention" for i in range(text_layers)],
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "mrope_interleaved": True,
                                "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
            "pad_token_id": PAD_TOKEN, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"depth": depth, "hidden_size": 32, "intermediate_size": 64, "num_heads": 4, "patch_size": QWEN_PATCH,
              "temporal_patch_size": QWEN_TEMPORAL, "spatial_merge_size": QWEN_MERGE, "in_channels": 3,
              "out_hidden_size": 64, "num_position_embeddings": 16}
    config = Qwen3_5Config(vision_config=vision, text_config=text, image_token_id=QWEN_IMAGE,
                           video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START, vision_end_token_id=QWEN_END)
    config._attn_implementation = attn_implementation
    for sub in ("vision_config", "text_config"):
        getattr(config, sub)._attn_implementation = attn_implementation
    model = Qwen3_5ForConditionalGeneration(config)
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()


# ---- LLaVA-NeXT-Video --------------------------------------------------------------------------
NEXT_VIDEO_TOKEN = 121
NEXT_VIDEO_SIZE, NEXT_VIDEO_PATCH = 16, 2  # 8x8 patches per frame, pooled 2x2 -> 4x4 = 16 tokens per frame


def tiny_llava_next_video(*, attn_implementation: str = "eager", text_layers: int = 2, pool: str = "average",
                          seed: int = 0):
    """A LLaVA-NeXT-Video-shaped model: LLaVA-NeXT's anyres images (pinpoints up to 2x2 crops,
    image_newline tokens) and video frames through the same CLIP, pooled 2x2 (``pool``: average, max
    or conv) into 16 tokens per frame."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    s = NEXT_VIDEO_SIZE
    config = LlavaNextVideoConfig(
        vision_config=_vision(s, NEXT_VIDEO_PATCH, 4, 32),
        text_config=_text(64, text_layers),
        image_token_id=IMAGE_TOKEN,
        video_token_id=NEXT_VIDEO_TOKEN,
        image_grid_pinpoints=[[s, s], [s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        spatial_pool_mode=pool,
        spatial_pool_stride=2,
    )
    config._attn_implementation = attn_implementation
    model = LlavaNextVideoForConditionalGeneration(config)
    with torch.no_grad():
        model.model.image_newline.normal_()
    model.generation_config.pad_token_id = PAD_TOKEN
    return model.eval()


def next_video_inputs(model, items_per_prompt: list[list[tuple]], text_lens: list[int], *, seed: int = 0) -> dict:
    """Left-padded inputs for prompts of ``("image", (height, width))`` and ``("video", frames)`` items:
    input_ids, attention_mask, pixel_values + image_sizes (5 anyres views of 16 px per image) and
    pixel_values_videos (videos, frames, 3, 16, 16; every video of a batch has the same frame count)."""
    gen = torch.Generator().manual_seed(seed)
    s = NEXT_VIDEO_SIZE
    images = [size for items in items_per_prompt for kind, size in items if kind == "image"]
    videos = [frames for items in items_per_prompt for kind, frames in items if kind == "video"]
    out: dict[str, torch.Tensor] = {}
    counts = []
    if images:
        out["pixel_values"] = torch.randn(len(images), 5, 3, s, s, generator=gen)
        out["image_sizes"] = torch.tensor(images)
        counts = image_token_counts(model, out["pixel_values"], out["image_sizes"])
    if videos:
        if len(set(videos)) != 1:
            raise ValueError("the videos of one batch need the same number of frames")
        out["pixel_values_videos"] = torch.randn(len(videos), videos[0], 3, s, s, generator=gen)
    per_frame = (s // NEXT_VIDEO_PATCH // model.config.spatial_pool_stride) ** 2
    image_counts = iter(counts)
    rows = []
    for items, n_text in zip(items_per_prompt, text_lens):
        pieces = len(items) + 1
        cuts = [n_text * i // pieces for i in range(pieces + 1)]
        row = [1]
        for i in range(pieces):
            row += torch.randint(3, IMAGE_TOKEN - 1, (cuts[i + 1] - cuts[i],), generator=gen).tolist()
            if i < len(items):
                kind, size = items[i]
                row += [IMAGE_TOKEN] * next(image_counts) if kind == "image" else [NEXT_VIDEO_TOKEN] * (per_frame * size)
        rows.append(row)
    length = max(len(r) for r in rows)
    out["input_ids"] = torch.full((len(rows), length), PAD_TOKEN, dtype=torch.long)
    out["attention_mask"] = torch.zeros(len(rows), length, dtype=torch.long)
    for b, row in enumerate(rows):
        out["input_ids"][b, length - len(row) :] = torch.tensor(row)
        out["attention_mask"][b, length - len(row) :] = 1
    return out
