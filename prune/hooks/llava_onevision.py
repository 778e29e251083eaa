"""LLaVA-OneVision (LlavaOnevisionForConditionalGeneration): SigLIP encoder without [CLS],
anyres-max crops, and video frames pooled 2x2.

Images: view 0 is the base image's patch grid; view 1 is the crop grid as the LLM sees it, after
unpadding and, for large images, the bilinear downscale of ``anyres_max_N``. The crop grid's shape
and its scores come from the model's own ``pack_image_features`` run on the statistics (so they are
unpadded and interpolated exactly like the features); its ``image_newline`` tokens are never pruned.
The budget is split over the two views in proportion to their tokens (no reference exists; HiPrune's
even split would starve the much larger crop grid). Images of multi-image prompts
(``batch_num_images`` > 1) are one view, as the model does not crop them.
Videos: every frame is a view of its pooled grid, whose scores are pooled with the same bilinear
resize; the newline token after the video is never pruned.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

from .base import ImageLayout
from .llava import LlavaAdapter


class LlavaOnevisionAdapter(LlavaAdapter):
    family = "llava_onevision"
    model_classes = ("LlavaOnevisionForConditionalGeneration",)
    feature_functions = {"image": "get_image_features", "video": "get_video_features"}

    def placeholder_id(self, modality: str) -> int:
        config = self.model.config
        return int(config.image_token_id if modality == "image" else config.video_token_id)

    def _pack(self, per_view: torch.Tensor, image_size: torch.Tensor, aspect: str) -> torch.Tensor:
        """(views, n, K) values -> the packed (tokens, K) sequence of one image, newline rows = NaN."""
        newline = per_view.new_full((per_view.shape[-1],), float("nan"))
        packed, _ = self.model.model.pack_image_features(
            [per_view], image_size[None], image_newline=newline, vision_aspect_ratio=aspect
        )
        return packed[0]

    def layouts(self, modality: str, args: dict[str, Any], signals: dict[str, torch.Tensor]) -> list[ImageLayout]:
        self._check_strategy()
        if modality == "video":
            return self._video_layouts(args, signals)
        config = self.model.config
        image_sizes = torch.as_tensor(args["image_sizes"]).cpu()
        aspect = args.get("vision_aspect_ratio") or config.vision_aspect_ratio
        batch_num_images = args.get("batch_num_images")
        if batch_num_images is None:
            need_patching = [True] * len(image_sizes)
        else:
            need_patching = [int(n) == 1 for n in batch_num_images for _ in range(int(n))]
        side = self.patch_grid()
        n = side * side
        keys = list(signals)
        layouts, first = [], 0
        for size, patch in zip(image_sizes, need_patching):
            count = (
                image_size_to_num_patches(
                    image_size=size, grid_pinpoints=config.image_grid_pinpoints, patch_size=config.vision_config.image_size
                )
                if patch
                else 1
            )
            # the layout from a pack of ones on the host (newline rows come out NaN); the statistics
            # packed the same way on their device (unpadded and interpolated like the features)
            is_newline = self._pack(torch.ones(count, n, 1), size, aspect)[:, 0].isnan()
            packed = None
            if keys:
                packed = self._pack(torch.stack([signals[k][first : first + count, :n].float() for k in keys], -1),
                                    size, aspect)
            total = is_newline.numel()
            token_view = torch.zeros(total, dtype=torch.long)
            token_patch = torch.arange(total)
            grids = [(side, side)]
            view_signals = [{k: packed[:n, i] for i, k in enumerate(keys)}]
            if count > 1:
                rows = int(is_newline[n:].sum())
                cols = (total - n) // rows - 1
                grids.append((rows, cols))
                if keys:
                    crop = packed[n:].view(rows, cols + 1, -1)[:, :cols].reshape(rows * cols, -1)
                    view_signals.append({k: crop[:, i] for i, k in enumerate(keys)})
                else:
                    view_signals.append({})
                token_view[n:] = 1
                token_patch[n:] = torch.arange(rows * (cols + 1)).view(rows, cols + 1).sub(
                    torch.arange(rows)[:, None]
                ).view(-1)  # raster index in the (rows, cols) grid once newlines are skipped
            token_view[is_newline] = -1
            token_patch[is_newline] = -1
            layouts.append(ImageLayout(grids=grids, token_view=token_view, token_patch=token_patch,
                                       signals=view_signals, split="proportional"))
            first += count
        return layouts

    def _video_layouts(self, args: dict[str, Any], signals: dict[str, torch.Tensor]) -> list[ImageLayout]:
        # the argument is pixel_values_videos in transformers >= 5.2x, pixel_values before
        videos = args["pixel_values_videos"] if "pixel_values_videos" in args else args["pixel_values"]
        batch, frames = videos.shape[:2]
        side = self.patch_grid()
        pooled = (math.ceil(side / 2), math.ceil(side / 2))
        per_frame = pooled[0] * pooled[1]
        pooled_signals = {
            # the same bilinear resize the model applies to the frame features (apply_pooling)
            k: F.interpolate(s[:, : side * side].float().view(-1, 1, side, side), size=pooled, mode="bilinear")
            .view(batch, frames, per_frame)
            for k, s in signals.items()
        }
        token_view = torch.cat([torch.arange(frames).repeat_interleave(per_frame), torch.tensor([-1])])
        token_patch = torch.cat([torch.arange(per_frame).repeat(frames), torch.tensor([-1])])
        return [
            ImageLayout(
                grids=[pooled] * frames,
                token_view=token_view,
                token_patch=token_patch,
                signals=[{k: s[b, f] for k, s in pooled_signals.items()} for f in range(frames)],
            )
            for b in range(batch)
        ]
