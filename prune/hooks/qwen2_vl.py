"""Qwen2-VL (Qwen2VLForConditionalGeneration): native-resolution ViT without [CLS]; every
``spatial_merge_size``^2 consecutive patches are merged into one LLM token; images and videos.

Scores of an encoder layer are per patch; a merged token's score is the mean over its 2x2 merge
unit, and each image or temporal slice of a video (2 frames) is a view whose grid is the merged
grid (grid_h / 2, grid_w / 2) in raster order, as the tokens sit in the prompt. Positions stay
"original": kept tokens keep their (t, h, w) M-RoPE ids (computed by the model from the full,
unpruned prompt), so ``rope_deltas`` and decoding see the logical layout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..methods import EncoderInfo
from ..methods.base import to_device
from .base import Adapter, ImageLayout

_GRID_ARG = {"image": "image_grid_thw", "video": "video_grid_thw"}


class Qwen2VLAdapter(Adapter):
    family = "qwen2_vl"
    model_classes = ("Qwen2VLForConditionalGeneration",)
    feature_functions = {"image": "get_image_features", "video": "get_video_features"}
    position_modes = ("original",)
    segmented_vision = True  # every Qwen ViT packs images / frames (and 2.5's windows) with cu_seqlens
    # the M-RoPE index (a loop over the prompts reading ids, token types, grids, mask) runs on host copies
    host_helpers = {**Adapter.host_helpers, "get_rope_index": False}

    def multimodal_module(self) -> nn.Module:
        return self.model.model

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def visual(self) -> nn.Module:
        return self.model.model.visual

    def vision_attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in self.visual().blocks]

    def encoder_info(self) -> EncoderInfo:
        depth = len(self.visual().blocks)
        return EncoderInfo(num_layers=depth, feature_layer=depth - 1, has_cls=False, family=self.family)

    def placeholder_id(self, modality: str) -> int:
        config = self.model.config
        return int(config.image_token_id if modality == "image" else config.video_token_id)

    def later_turn_arguments(self, kwargs: dict[str, Any], physical: int, logical: int) -> dict[str, Any]:
        """Qwen's ``generate`` decides whether a later turn brings new media from the token types past the
        cache's length (``mm_token_type_ids[:, cache length:]``) and, if so, recomputes the M-RoPE
        positions and resets ``rope_deltas``. After a pruned prefill that length is physical: the types of
        the history's tokens the cache holds logically (columns physical..logical) are cleared in a copy,
        so only tokens past the cached history count as new."""
        types = kwargs.get("mm_token_type_ids")
        if not isinstance(types, torch.Tensor) or types.ndim != 2 or types.shape[1] <= physical:
            return kwargs
        types = types.clone()
        types[:, physical:logical] = 0
        return dict(kwargs, mm_token_type_ids=types)

    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def unit_order(self, grid_thw: torch.Tensor) -> torch.Tensor | None:
        """Index that puts the encoder's merge units back in raster order (None: already are); host
        arithmetic on the host ``grid_thw``."""
        return None

    def grid_of(self, modality: str, args: dict[str, Any]) -> torch.Tensor:
        """The (items, 3) host ``grid_thw`` among a feature function's arguments."""
        grid_thw = args.get(_GRID_ARG[modality])
        if grid_thw is None:
            raise ValueError(f"{_GRID_ARG[modality]} is needed with the {modality} pixel values")
        return torch.as_tensor(grid_thw).cpu()  # already on the host: the feature function copied it

    def layouts(self, modality: str, args: dict[str, Any], signals: dict[str, torch.Tensor]) -> list[ImageLayout]:
        grid_thw = self.grid_of(modality, args)
        m = self.merge_size()
        units = {}
        order = self.unit_order(grid_thw) if signals else None
        for key, stats in signals.items():
            per_unit = stats.reshape(-1, m * m).mean(-1)  # (units,) in the encoder's order
            units[key] = per_unit[to_device(order, per_unit.device)] if order is not None else per_unit
        layouts, first = [], 0
        for t, h, w in grid_thw.tolist():
            hm, wm = h // m, w // m
            per_view = hm * wm
            layouts.append(
                ImageLayout(
                    grids=[(hm, wm)] * t,
                    token_view=torch.arange(t).repeat_interleave(per_view),
                    token_patch=torch.arange(per_view).repeat(t),
                    signals=[
                        {key: u[first + v * per_view : first + (v + 1) * per_view] for key, u in units.items()}
                        for v in range(t)
                    ],
                )
            )
            first += t * per_view
        return layouts
