"""Gemma 3 (Gemma3ForConditionalGeneration): SigLIP without [CLS], its patch grid average-pooled
(4x4 on the real 896 px / 14 px = 64x64 grid) into 256 tokens per image; a pan-and-scan crop is one
more image of its own (own placeholders, own budget), as the model sees it.

Scores of an encoder layer are per patch and pooled with the projector's own kernel, so a token's
score is the mean over the patches it averages. Image tokens attend to each other bidirectionally:
the model turns ``token_type_ids`` into block masks (``create_masks_for_generate``), and hands its
language model a dict of 4-D masks (full and sliding-window layers) instead of the 2-D mask. The
cut therefore works on the 2-D mask and ``token_type_ids`` of the model's own call, gathers both
with the kept rows, and rebuilds every mask with the model's own mask function on the cut sequence;
decode steps rebuild them for the shorter cache. Sliding windows then count kept tokens (as the
unwrapped model run on the reduced sequence does).

In-LLM methods are refused: the decoder cut builds one causal mask per stage, not Gemma's sliding
and bidirectional ones.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._compat import call_with_cache, find_cache, past_length
from ..methods import EncoderInfo
from .base import Adapter, ImageLayout, bind_arguments


class Gemma3Adapter(Adapter):
    family = "gemma3"
    model_classes = ("Gemma3ForConditionalGeneration",)
    static_decode = False  # its decode masks (sliding, bidirectional images) are rebuilt below from the 2-D mask

    def multimodal_module(self) -> nn.Module:
        return self.model.model

    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    def vision_model(self) -> nn.Module:
        tower = self.model.model.vision_tower
        return getattr(tower, "vision_model", tower)

    def vision_attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in self.vision_model().encoder.layers]

    def encoder_info(self) -> EncoderInfo:
        n = len(self.vision_attention_modules())
        return EncoderInfo(num_layers=n, feature_layer=n - 1, has_cls=False, family=self.family)

    def placeholder_id(self, modality: str) -> int:
        return int(self.model.config.image_token_id)

    def install(self, state, method) -> None:
        if getattr(method, "in_llm", False):
            raise ValueError(
                f"{method.name} (an in-LLM method) is not supported on Gemma 3: its language model mixes "
                "sliding-window and full-attention layers with bidirectional image blocks, which the decoder "
                "cut does not rebuild; use a vision-side method (random, pool, hiprune)"
            )
        super().install(state, method)

    # ---- layout ----------------------------------------------------------------------------------
    def _grids(self) -> tuple[int, int]:
        """(patches per side, tokens per side)."""
        vc = self.model.config.vision_config
        tokens = int(round(self.model.config.mm_tokens_per_image**0.5))
        return vc.image_size // vc.patch_size, tokens

    def layouts(
        self, modality: str, args: dict[str, Any], signals: dict[str, torch.Tensor]
    ) -> list[ImageLayout]:
        pixel_values = args["pixel_values"]
        patches, tokens = self._grids()
        kernel = patches // tokens
        pooled = {
            # the projector's AvgPool2d, run on the scores: (images, tokens * tokens)
            key: F.avg_pool2d(
                s[:, : patches * patches].float().view(-1, 1, patches, patches), kernel
            ).flatten(1)
            for key, s in signals.items()
        }
        n = tokens * tokens
        return [
            ImageLayout(
                grids=[(tokens, tokens)],
                token_view=torch.zeros(n, dtype=torch.long),
                token_patch=torch.arange(n),
                signals=[{key: p[i] for key, p in pooled.items()}],
            )
            for i in range(pixel_values.shape[0])
        ]

    # ---- the cut: 2-D mask and token_type_ids, then the model's own masks ---------------------------
    def _on_multimodal_call(self, module, args, kwargs):
        bound = bind_arguments(module.forward, args, kwargs)
        mask = bound.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim != 2:
            mask = None  # a prepared 4-D mask: the language-model hook refuses it if it must cut
        self.state._scratch["gemma_call"] = {
            "mask2d": mask if isinstance(mask, torch.Tensor) else None,
            "token_type_ids": bound.get("token_type_ids"),
            "prepared": isinstance(mask, dict),
        }
        return super()._on_multimodal_call(module, args, kwargs)

    def _masks(self, kwargs: dict[str, Any], token_type_ids) -> Any:
        model_cls = type(self.model)
        return call_with_cache(
            model_cls.create_masks_for_generate,
            find_cache(kwargs),
            config=self.model.config,
            inputs_embeds=kwargs["inputs_embeds"],
            attention_mask=kwargs["attention_mask"],
            position_ids=kwargs.get("position_ids"),
            token_type_ids=token_type_ids,
            is_first_iteration=token_type_ids is not None,
        )

    def _on_language_model_call(self, module, args, kwargs):
        if args:
            kwargs, args = bind_arguments(module.forward, args, kwargs), ()
        call = self.state._scratch.get("gemma_call") or {}
        masks = kwargs.get("attention_mask")
        plain = kwargs
        if isinstance(masks, dict):
            if call.get("prepared"):
                plain = kwargs  # masks prepared for a static cache: the cut reads the padding off them
            else:
                plain = dict(kwargs, attention_mask=call.get("mask2d"))
        out = super()._on_language_model_call(module, args, plain)
        if out is None:
            return None
        new_args, new_kwargs = out
        if past_length(kwargs) > 0:  # a decode step after a pruned prefill: masks for the shorter cache
            new_kwargs["attention_mask"] = self._masks(new_kwargs, None)
        return new_args, new_kwargs

    def cut_sequence_arguments(self, kwargs, new_kwargs, keep_mask: torch.Tensor) -> dict[str, Any]:
        token_type_ids = (self.state._scratch.get("gemma_call") or {}).get("token_type_ids")
        if token_type_ids is not None:
            token_type_ids = self.packing(keep_mask).sequence(token_type_ids.to(keep_mask.device))
        out = dict(new_kwargs)
        out["attention_mask"] = self._masks(new_kwargs, token_type_ids)
        return out
