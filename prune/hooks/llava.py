"""LLaVA-1.5 (LlavaForConditionalGeneration): one CLIP grid per image, features from layer -2."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods import EncoderInfo
from .base import Adapter, ImageLayout, slice_view_signals

# vision encoders whose sequence starts with a [CLS] token (SigLIP has none)
CLS_ENCODERS = ("clip_vision_model", "clip", "dinov2", "vit")


class LlavaAdapter(Adapter):
    family = "llava"
    model_classes = ("LlavaForConditionalGeneration",)

    def multimodal_module(self) -> nn.Module:
        return self.model.model

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def vision_model(self) -> nn.Module:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    def vision_attention_modules(self) -> list[nn.Module]:
        encoder = self.vision_model().encoder
        if hasattr(encoder, "layers"):  # CLIP, SigLIP
            return [layer.self_attn for layer in encoder.layers]
        # DINOv2 / ViT: layer.attention is the attention module, or (older transformers) wraps it
        modules = []
        for layer in encoder.layer:
            inner = getattr(layer.attention, "attention", None)
            modules.append(inner if isinstance(inner, nn.Module) else layer.attention)
        return modules

    def placeholder_id(self, modality: str) -> int:
        return int(self.model.config.image_token_id)

    def feature_layer_index(self) -> int:
        """Encoder layer whose output the projector reads (hidden_states[k] is layer k-1's output)."""
        num_layers = len(self.vision_attention_modules())
        layer = self.model.config.vision_feature_layer
        if isinstance(layer, (list, tuple)):
            layer = max(li if li >= 0 else li + num_layers + 1 for li in layer)
        hidden_index = layer if layer >= 0 else layer + num_layers + 1
        return max(0, hidden_index - 1)

    def encoder_info(self) -> EncoderInfo:
        cfg = self.model.config.vision_config
        has_cls = getattr(cfg, "model_type", "") in CLS_ENCODERS
        return EncoderInfo(
            num_layers=len(self.vision_attention_modules()),
            feature_layer=self.feature_layer_index(),
            has_cls=has_cls,
            family=self.family,
        )

    def patch_grid(self, pixel_values: torch.Tensor | None = None) -> int:
        """Patches per side: of the pixels given (encoders that interpolate positions, e.g. DINOv2,
        take other sizes than their config's), else of the config's image size."""
        cfg = self.model.config.vision_config
        if pixel_values is not None:
            height, width = pixel_values.shape[-2:]
            if height != width:
                raise ValueError(f"LLaVA images must be square, got {height} x {width} pixels")
            return height // cfg.patch_size
        return cfg.image_size // cfg.patch_size

    def _check_strategy(self) -> None:
        # Every LLM token must be a patch: drop [CLS] ("default") when the encoder has one, else "full".
        expected = "default" if self.encoder_info().has_cls else "full"
        strategy = self.model.config.vision_feature_select_strategy
        if strategy != expected:
            raise ValueError(
                f"prune supports vision_feature_select_strategy={expected!r} on this encoder (patch tokens "
                f"only); this model uses {strategy!r}"
            )

    def patch_offset(self) -> int:
        """Column of patch 0 in the encoder's attention statistics (1 when a [CLS] token leads)."""
        return 1 if self.encoder_info().has_cls else 0

    def layouts(self, modality, args: dict[str, Any], signals) -> list[ImageLayout]:
        self._check_strategy()
        pixel_values = args["pixel_values"]
        if args.get("image_sizes") is not None:
            raise ValueError("LlavaForConditionalGeneration with image_sizes (variable-size vision towers) is not supported")
        side = self.patch_grid(pixel_values)
        n = side * side
        offset = self.patch_offset()
        return [
            ImageLayout(
                grids=[(side, side)],
                token_view=torch.zeros(n, dtype=torch.long),
                token_patch=torch.arange(n),
                signals=[slice_view_signals(signals, i, offset, n)],
            )
            for i in range(pixel_values.shape[0])
        ]
