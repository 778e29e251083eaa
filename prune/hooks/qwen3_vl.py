"""Qwen3-VL (Qwen3VLForConditionalGeneration, Qwen3VLMoeForConditionalGeneration): Qwen2-VL's token
layout (a 2x2 merge unit per LLM token, full attention in every vision block) plus DeepStack.

DeepStack: the vision blocks ``deepstack_visual_indexes`` (8, 16, 24 of 27 on the 8B) each feed a
merger whose (n_visual, D) output is added to the hidden states after decoder layer 0, 1, 2 at the
visual positions. The language model takes them as a (B, L) bool mask of the visual positions and a
list with one (n_visual, D) tensor per layer. A cut must drop the same rows from the mask and from
every tensor of the list, or the features land on the wrong tokens:

- vision-side methods: the language model's input is cut once; the mask is gathered with the kept
  rows and each DeepStack tensor keeps the rows of the kept visual tokens (``cut_sequence_arguments``).
  The two arguments are found by what they are (bound from the forward's signature: the list of
  (n_visual, D) tensors and the (B, L) bool tensor with n_visual True entries that marks the visual
  placeholders), never by keyword; a call whose structure is not recognised raises.
- in-LLM methods: the text model's ``_deepstack_process`` (the seam DeepStack goes through) is wrapped
  so that after a cut it gets the mask and rows of the tokens the current layers still see.

``pool`` merges the main embeddings of a cell into its first patch; a pooled token's DeepStack rows
are that first patch's (not averaged). Video: the processor puts timestamp text between temporal
slices; each slice is a view of its own, exactly as in Qwen2-VL, so text between slices is never
pruned. Positions stay "original": interleaved M-RoPE (t, h, w) ids of the unpruned prompt.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import bind_arguments
from .qwen2_vl import Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    model_classes = ("Qwen3VLForConditionalGeneration", "Qwen3VLMoeForConditionalGeneration")

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        lm = self.language_model()
        if self.deepstack_layers() and not callable(getattr(lm, "_deepstack_process", None)):
            raise TypeError(
                f"{type(lm).__name__} has no _deepstack_process: prune does not recognise this Qwen3-VL "
                "language model's DeepStack structure"
            )

    def deepstack_layers(self) -> list[int]:
        return list(getattr(self.model.config.vision_config, "deepstack_visual_indexes", None) or [])

    def vision_readout_layers(self) -> list[int]:
        return self.deepstack_layers()

    # ---- vision-side methods: gather DeepStack's mask and features with the kept rows -----------
    def _deepstack_arguments(self, kwargs: dict[str, Any], embeds: torch.Tensor) -> tuple[str, str] | None:
        """(mask name, features name) among the language model's arguments, found by what they are."""
        batch, length, dim = embeds.shape
        lists = [
            name
            for name, value in kwargs.items()
            if isinstance(value, (list, tuple))
            and value
            and all(isinstance(t, torch.Tensor) and t.ndim == 2 and t.shape[-1] == dim for t in value)
            and len({t.shape[0] for t in value}) == 1
        ]
        if not lists:
            return None
        if len(lists) > 1:
            raise RuntimeError(f"prune: more than one DeepStack-like argument of the language model: {lists}")
        rows = kwargs[lists[0]][0].shape[0]
        masks = [
            name
            for name, value in kwargs.items()
            if isinstance(value, torch.Tensor)
            and value.dtype == torch.bool
            and tuple(value.shape) == (batch, length)
            and value is not kwargs.get("attention_mask")
        ]
        if len(masks) > 1:  # the structure does not tell: the one marking as many positions as rows (a read)
            masks = [name for name in masks if int(kwargs[name].sum()) == rows]
        if len(masks) != 1:
            raise RuntimeError(
                "prune: the Qwen3-VL language model got DeepStack features but no unique (batch, length) mask "
                f"of their {rows} visual positions (candidates: {masks})"
            )
        return masks[0], lists[0]

    def cut_sequence_arguments(self, kwargs, new_kwargs, keep_mask: torch.Tensor) -> dict[str, Any]:
        found = self._deepstack_arguments(kwargs, kwargs["inputs_embeds"])
        if found is None:
            if self.deepstack_layers():  # rows were cut, so visual tokens are there: so must DeepStack be
                raise RuntimeError(
                    "prune: Qwen3-VL visual tokens were pruned but the language model got no DeepStack arguments "
                    "(a (batch, length) bool mask and a list of (n_visual, hidden) tensors) to cut with them"
                )
            return new_kwargs
        mask_name, list_name = found
        visual = kwargs[mask_name].to(keep_mask.device)
        rows = kwargs[list_name][0].shape[0]
        # (n_visual,) kept flags in the features' row order (row-major), sized from the features' rows
        where = torch.nonzero_static(visual.flatten(), size=rows).view(-1)
        kept_visual = keep_mask.flatten()[where]
        removed = self.state._scratch.get("cut_removed")  # host: rows the cut removed (None: read back)
        take = (kept_visual.nonzero() if removed is None else torch.nonzero_static(kept_visual, size=rows - removed))
        take = take.view(-1)
        out = dict(new_kwargs)
        out[mask_name] = self.packing(keep_mask).sequence(visual)  # packing keeps row-major order
        out[list_name] = [t[take.to(t.device)] for t in kwargs[list_name]]
        return out

    def _on_language_model_call(self, module, args, kwargs):
        if args:  # bind positional arguments so that the cut sees them all by name
            kwargs, args = bind_arguments(module.forward, args, kwargs), ()
        return super()._on_language_model_call(module, args, kwargs)

    # ---- in-LLM methods: map DeepStack onto the rows each layer sees ---------------------------
    def install(self, state, method) -> None:
        super().install(state, method)
        cut = self.decoder_cut
        if cut is None or not cut.schedule or not self.deepstack_layers():
            return
        lm = self.language_model()
        original = lm._deepstack_process  # bound method of the class

        def deepstack_process(hidden_states, visual_pos_masks, visual_embeds):
            ctx = cut.context
            if (
                ctx is not None
                and ctx.phase == "prefill"
                and visual_pos_masks is not None
                and ctx.stages[-1].layer > 0
            ):
                rows = ctx.stages[-1].rows.to(visual_pos_masks.device)  # (B, Ls) input column, -1 = padding
                valid = rows >= 0
                index = (visual_pos_masks.flatten().long().cumsum(0) - 1).view_as(visual_pos_masks)
                seen = visual_pos_masks.gather(1, rows.clamp(min=0)) & valid
                take = index.gather(1, rows.clamp(min=0))[seen]
                visual_pos_masks, visual_embeds = seen, visual_embeds[take.to(visual_embeds.device)]
            return original(hidden_states, visual_pos_masks, visual_embeds)

        lm._deepstack_process = deepstack_process

        def remove() -> None:
            if lm.__dict__.get("_deepstack_process") is deepstack_process:
                del lm._deepstack_process

        state._removers.append(remove)
