"""InternVL 3 / 3.5 (InternVLForConditionalGeneration): InternViT with a [CLS] token on 448 px tiles
(dynamic tiles plus a thumbnail per image), features of ``vision_feature_layer`` without [CLS],
pixel shuffle (each 2x2 patch unit -> one token: 256 tokens per tile).

Each tile is a view whose grid is the shuffled grid (16 x 16 on the real model); a token's score is
the mean over its 2x2 unit of patches, the units in raster order as ``pixel_shuffle`` makes them.
The model's call does not say which tiles belong to which image: the prompt does, since each image
is one run of placeholder tokens (``<img> ... </img>``) of 256 x its tile count. One image's budget
is split evenly over its tiles (thumbnail included), as HiPrune's LLaVA-NeXT reference splits over
its crops. ``cls`` works (InternViT has [CLS]); 1-D RoPE text model: positions original or compact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..methods import EncoderInfo
from .base import Adapter, Expanded, ImageLayout, expansion


class InternVLAdapter(Adapter):
    family = "internvl"
    model_classes = ("InternVLForConditionalGeneration",)

    def multimodal_module(self) -> nn.Module:
        return self.model.model

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.attention for layer in self.model.model.vision_tower.encoder.layer]

    def placeholder_id(self, modality: str) -> int:
        return int(self.model.config.image_token_id)

    def feature_layer_index(self) -> int:
        n = len(self.vision_attention_modules())
        layer = self.model.config.vision_feature_layer
        if isinstance(layer, (list, tuple)):
            raise ValueError("InternVL with several vision_feature_layer values is not supported")
        # -1: last_hidden_state; k >= 0: hidden_states[k], the output of layer k - 1
        return n - 1 if layer == -1 else (layer + n + 1 if layer < 0 else layer) - 1

    def encoder_info(self) -> EncoderInfo:
        return EncoderInfo(
            num_layers=len(self.vision_attention_modules()),
            feature_layer=self.feature_layer_index(),
            has_cls=True,
            family=self.family,
        )

    def _check(self) -> tuple[int, int]:
        """(patches per side, tokens per side) of one tile."""
        config = self.model.config
        if config.vision_feature_select_strategy != "default":
            raise ValueError(
                "prune supports InternVL with vision_feature_select_strategy='default' (patch tokens only)"
            )
        if float(config.downsample_ratio) != 0.5:
            raise ValueError(
                f"prune supports InternVL's 2x2 pixel shuffle (downsample_ratio 0.5), got {config.downsample_ratio}"
            )
        vc = config.vision_config
        size = vc.image_size[0] if isinstance(vc.image_size, (list, tuple)) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, (list, tuple)) else vc.patch_size
        return size // patch, size // patch // 2

    def install(self, state, method) -> None:
        self._check()  # a layout prune cannot map is refused at wrap time
        super().install(state, method)

    def _select(self, modality, call, fn_args, signals, embeds, keep_mask, records):
        scratch = self.state._scratch  # per call: which tiles form one image is read from the prompt
        outer = scratch.get("internvl_call")
        scratch["internvl_call"] = call
        try:
            return super()._select(modality, call, fn_args, signals, embeds, keep_mask, records)
        finally:
            scratch["internvl_call"] = outer

    def _tiles_per_image(self, modality: str, per_tile: int) -> list[int]:
        mask = self._host_placeholder_mask(modality, self.state._scratch["internvl_call"])
        tiles = []
        for row in mask:
            padded = torch.cat([torch.zeros(1, dtype=torch.bool), row, torch.zeros(1, dtype=torch.bool)])
            edges = torch.nonzero(padded[1:] != padded[:-1], as_tuple=True)[0].view(-1, 2)
            for start, end in edges.tolist():
                if (end - start) % per_tile:
                    raise RuntimeError(
                        f"an InternVL image run of {end - start} tokens is not a multiple of {per_tile}"
                    )
                tiles.append((end - start) // per_tile)
        return tiles

    def layouts(
        self, modality: str, args: dict[str, Any], signals: dict[str, torch.Tensor]
    ) -> list[ImageLayout]:
        patches, tokens = self._check()
        per_tile = tokens * tokens
        n_tiles = args["pixel_values"].shape[0]
        tiles = self._tiles_per_image(modality, per_tile)
        if sum(tiles) != n_tiles:
            call = self.state._scratch["internvl_call"]
            host_call = {"input_ids": call["host:ids"]} if call.get("host:ids") is not None else call
            copies = expansion(sum(tiles), n_tiles, host_call, self._host_placeholder_mask(modality, call).shape[0])
            if copies:
                raise Expanded(copies)  # beams / num_return_sequences: select per prompt, then copy
            raise RuntimeError(
                f"the prompt's image tokens cover {sum(tiles)} tiles but {n_tiles} tiles were encoded"
            )
        units = {
            # drop [CLS] (column 0), then mean over each 2x2 unit: (tiles, tokens * tokens) in raster order
            key: F.avg_pool2d(
                s[:, 1 : 1 + patches * patches].float().view(-1, 1, patches, patches), 2
            ).flatten(1)
            for key, s in signals.items()
        }
        layouts, first = [], 0
        for count in tiles:
            layouts.append(
                ImageLayout(
                    grids=[(tokens, tokens)] * count,
                    token_view=torch.arange(count).repeat_interleave(per_tile),
                    token_patch=torch.arange(per_tile).repeat(count),
                    signals=[{key: u[first + v] for key, u in units.items()} for v in range(count)],
                )
            )
            first += count
        return layouts
