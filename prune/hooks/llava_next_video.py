"""LLaVA-NeXT-Video (LlavaNextVideoForConditionalGeneration): LLaVA-NeXT's images (anyres base image
+ crops, unpadded, ``image_newline`` after each crop row: :class:`LlavaNextAdapter`) and videos whose
frames run through the same CLIP one by one, are pooled ``spatial_pool_stride`` x stride (average,
max or a strided conv: 24 x 24 -> 12 x 12 on the 7B) and follow each other without separators.

Each frame of a video is a view of its pooled grid; a pooled token's score is the mean over the
stride x stride patches it covers. A video's budget is spread evenly over its frames, as for every
video here. No token of a video is never-pruned (there are no newlines between frames).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from .base import ImageLayout
from .llava_next import LlavaNextAdapter


class LlavaNextVideoAdapter(LlavaNextAdapter):
    family = "llava_next_video"
    model_classes = ("LlavaNextVideoForConditionalGeneration",)
    feature_functions = {"image": "get_image_features", "video": "get_video_features"}

    def placeholder_id(self, modality: str) -> int:
        config = self.model.config
        return int(config.image_token_id if modality == "image" else config.video_token_id)

    def install(self, state, method) -> None:
        self._pool()  # a pooling or feature selection prune cannot map is refused at wrap time
        self._check_strategy()
        super().install(state, method)

    def _pool(self) -> int:
        config = self.model.config
        if config.spatial_pool_mode not in ("average", "max", "conv"):
            raise ValueError(f"prune does not know LLaVA-NeXT-Video's spatial_pool_mode {config.spatial_pool_mode!r}")
        stride = int(config.spatial_pool_stride)
        if self.patch_grid() % stride:
            raise ValueError(
                f"prune supports a spatial_pool_stride that divides the {self.patch_grid()}-patch grid, got {stride}"
            )
        return stride

    def layouts(self, modality, args: dict[str, Any], signals) -> list[ImageLayout]:
        if modality == "image":
            return super().layouts(modality, args, signals)
        self._check_strategy()
        videos = args["pixel_values_videos"] if "pixel_values_videos" in args else args["pixel_values"]
        batch, frames = videos.shape[:2]
        side, stride = self.patch_grid(), self._pool()
        grid = (side // stride, side // stride)
        per_frame = grid[0] * grid[1]
        offset = self.patch_offset()
        pooled = {
            # (videos, frames, per_frame): each pooled token's score is the mean over the patches it pools
            key: F.avg_pool2d(s[:, offset : offset + side * side].float().view(-1, 1, side, side), stride)
            .view(batch, frames, per_frame)
            for key, s in signals.items()
        }
        return [
            ImageLayout(
                grids=[grid] * frames,
                token_view=torch.arange(frames).repeat_interleave(per_frame),
                token_patch=torch.arange(per_frame).repeat(frames),
                signals=[{key: p[b, f] for key, p in pooled.items()} for f in range(frames)],
            )
            for b in range(batch)
        ]
