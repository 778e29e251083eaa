"""LLaVA-NeXT (LlavaNextForConditionalGeneration): anyres base image + crops, unpadded, with an
``image_newline`` token after each row of the crop grid.

Where each placeholder token comes from is read off the model's own ``pack_image_features`` run on
(view, patch) indices instead of features, so unpadding follows the installed transformers exactly.
Newline tokens are never pruned. The per-image budget is split evenly over the base image and the
crops; a crop cannot take more than its patches left after unpadding, and what it cannot take goes
to the other views (the methods' ``views`` option gives the forks' ``int(T / views)`` or T per view;
README: "LLaVA-NeXT: prune's layout and the forks'").
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .base import ImageLayout, slice_view_signals
from .llava import LlavaAdapter


class LlavaNextAdapter(LlavaAdapter):
    family = "llava_next"
    model_classes = ("LlavaNextForConditionalGeneration",)

    def layouts(self, modality, args: dict[str, Any], signals) -> list[ImageLayout]:
        self._check_strategy()
        config = self.model.config
        image_sizes = args.get("image_sizes")
        if image_sizes is None:
            raise ValueError("LLaVA-NeXT needs image_sizes with pixel_values")
        side = self.patch_grid()
        n = side * side
        num_views = [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=config.image_grid_pinpoints,
                patch_size=config.vision_config.image_size,
            )
            for size in image_sizes
        ]
        # Fake "features": (views, patches, 2) holding (view, patch) as floats (exact below 2**24).
        index_features = []
        for count in num_views:
            view = torch.arange(count).view(count, 1).expand(count, n)
            patch = torch.arange(n).view(1, n).expand(count, n)
            index_features.append(torch.stack([view, patch], dim=-1).double())
        newline = torch.tensor([-1.0, -1.0], dtype=torch.float64)
        packed, _ = self.model.model.pack_image_features(
            index_features, image_sizes.cpu(), config.vision_feature_select_strategy, image_newline=newline
        )
        layouts, first = [], 0
        offset = self.patch_offset()
        for count, tokens in zip(num_views, packed):
            tokens = tokens.round().long()
            layouts.append(
                ImageLayout(
                    grids=[(side, side)] * count,
                    token_view=tokens[:, 0],
                    token_patch=tokens[:, 1],
                    signals=[slice_view_signals(signals, first + v, offset, n) for v in range(count)],
                )
            )
            first += count
        return layouts
