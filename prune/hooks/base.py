"""The adapter interface and the flow every adapter shares.

An adapter names a family's modules and tells where each image's tokens sit; everything else
(signal collection, budgets, selection, the cut, decoding) is done here, the same for all families.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..kernels import attention_stats
from ..methods import EncoderInfo, Method, SignalRequest, View
from ..state import ImageRecord, PruneRecord, PruneState
from .attention_tap import install_tap
from .cutter import cut_prefill, map_decode


@dataclass
class ImageLayout:
    """Where one image's placeholder tokens come from.

    views: indices of this image's views (base image, crops) in the vision encoder's batch.
    grid: (h, w) patches of every view.
    token_view: (n,) long, the view (0..len(views)-1) each placeholder token comes from; -1 for tokens
        that are never pruned (LLaVA-NeXT's image_newline).
    token_patch: (n,) long, the patch index inside its view (-1 where token_view is -1).
    """

    views: list[int]
    grid: tuple[int, int]
    token_view: torch.Tensor
    token_patch: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.token_view.numel())


def split_budget(total: int, caps: list[int]) -> list[int]:
    """Split ``total`` evenly over views (earlier views take the remainder), never above a view's
    cap; what a full view cannot take goes to the others."""
    shares = [0] * len(caps)
    remaining = min(total, sum(caps))
    while remaining > 0:
        open_views = [i for i, c in enumerate(caps) if shares[i] < c]
        each, extra = divmod(remaining, len(open_views))
        for rank, i in enumerate(open_views):
            add = min(caps[i] - shares[i], each + (1 if rank < extra else 0))
            shares[i] += add
            remaining -= add
    return shares


def _past_length(past_key_values: Any) -> int:
    if past_key_values is None:
        return 0
    if hasattr(past_key_values, "get_seq_length"):
        return int(past_key_values.get_seq_length())
    return int(past_key_values[0][0].shape[-2])  # legacy tuple cache


class Adapter:
    """Base class: one subclass per model family (one file each in ``prune/hooks/``)."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ---- what a family must say -------------------------------------------------------------
    def multimodal_module(self) -> nn.Module:
        """The module whose forward receives input_ids / pixel_values and calls the language model."""
        raise NotImplementedError

    def language_model(self) -> nn.Module:
        raise NotImplementedError

    def vision_attention_modules(self) -> list[nn.Module]:
        """The attention module of every vision-encoder layer, in order."""
        raise NotImplementedError

    def encoder_info(self) -> EncoderInfo:
        raise NotImplementedError

    def image_token_id(self) -> int:
        raise NotImplementedError

    def image_layouts(self, call: dict[str, Any]) -> list[ImageLayout]:
        """Layouts of the images of one call, in the order their tokens appear in the batch."""
        raise NotImplementedError

    def patch_offset(self) -> int:
        """Column of patch 0 in the encoder's attention statistics (1 when a [CLS] token leads)."""
        return 1 if self.encoder_info().has_cls else 0

    # ---- shared flow ------------------------------------------------------------------------
    def install(self, state: PruneState, method: Method) -> None:
        requests = method.bind(self.encoder_info())
        self.state, self.method = state, method
        by_layer: dict[int, list[SignalRequest]] = {}
        for req in requests:
            by_layer.setdefault(req.layer, []).append(req)
        attn = self.vision_attention_modules()
        for layer, reqs in by_layer.items():
            state._removers.append(install_tap(attn[layer], self._tap_callback(reqs)))
        mm = self.multimodal_module()
        state._removers.append(self._wrap_image_features(mm))
        h1 = mm.register_forward_pre_hook(self._on_multimodal_call, with_kwargs=True)
        h2 = self.language_model().register_forward_pre_hook(self._on_language_model_call, with_kwargs=True)
        state._removers.extend([h1.remove, h2.remove])

    def _wrap_image_features(self, mm: nn.Module):
        """Run the vision encoder under collection. transformers >= 5.2x's ``generate`` calls
        ``get_image_features`` before the prefill forward; older versions call it inside the forward,
        so the images are recorded here and consumed by the next prefill of the language model."""
        original = mm.get_image_features  # bound method of the class
        params = list(inspect.signature(original).parameters)
        state = self.state

        @functools.wraps(original)  # generate() reads its signature to route pixel_values
        def get_image_features(*args, **kwargs):
            bound = {**dict(zip(params, args)), **kwargs}
            state._signals.clear()
            state._collecting = True
            try:
                out = original(*args, **kwargs)
            finally:
                state._collecting = False
            state._images = {
                "pixel_values": bound.get("pixel_values"),
                "image_sizes": bound.get("image_sizes"),
            }
            return out

        mm.get_image_features = get_image_features

        def remove() -> None:
            if mm.__dict__.get("get_image_features") is get_image_features:
                del mm.get_image_features

        return remove

    def _tap_callback(self, requests: list[SignalRequest]):
        def callback(module, q, k, attention_mask, kwargs):
            if not self.state._collecting:
                return
            for req in requests:
                query_index = (
                    torch.zeros(1, dtype=torch.long, device=q.device) if req.query == "cls" else None
                )
                stats = attention_stats(
                    q.detach(), k.detach(), query_index=query_index, scale=kwargs.get("scaling")
                )  # (views, N_enc) fp32
                self.state._signals[req.key] = stats

        return callback

    def _on_multimodal_call(self, module, args, kwargs):
        if args:  # some families pass input_ids positionally
            params = list(inspect.signature(module.forward).parameters)
            kwargs = {**dict(zip(params, args)), **kwargs}
        if _past_length(kwargs.get("past_key_values")) > 0:
            return None  # a decode step: the language-model hook maps it
        self.state._call = {
            "input_ids": kwargs.get("input_ids"),
            "inputs_embeds": kwargs.get("inputs_embeds"),
        }
        return None

    def _image_token_mask(self, call: dict[str, Any], embeds: torch.Tensor) -> torch.Tensor:
        input_ids = call.get("input_ids")
        if input_ids is not None:
            return input_ids == self.image_token_id()
        # Same rule as transformers: placeholders are rows equal to the image token's embedding.
        token = torch.tensor(self.image_token_id(), device=embeds.device)
        ref = self.model.get_input_embeddings()(token)
        return (call["inputs_embeds"] == ref).all(-1)

    def _on_language_model_call(self, module, args, kwargs):
        state = self.state
        if "inputs_embeds" not in kwargs or kwargs["inputs_embeds"] is None:
            return None
        past_len = _past_length(kwargs.get("past_key_values"))
        if past_len > 0:
            if state._plan is None:
                return None
            return args, map_decode(kwargs, state._plan, past_len)
        call, images = state._call, state._images
        state._call, state._images = {}, None
        state._plan = None
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        keep_mask = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        if images is None or not call:
            state._signals = {}
            state.last = PruneRecord(keep_mask=keep_mask, images=[], positions=state.positions)
            return None  # no images in this prefill: pass through
        new_embeds, records = self._select(call, images, embeds, keep_mask)
        state._signals = {}
        if bool(keep_mask.all()):
            state.last = PruneRecord(keep_mask=keep_mask, images=records, positions=state.positions)
            return None  # nothing removed (keep=1.0): the model runs untouched
        kwargs = dict(kwargs, inputs_embeds=new_embeds)
        new_kwargs, plan, positions = cut_prefill(kwargs, keep_mask, state.positions)
        state._plan = plan
        state.last = PruneRecord(
            keep_mask=keep_mask, images=records, positions=state.positions, position_ids=positions
        )
        return args, new_kwargs

    def _select(self, call, images, embeds: torch.Tensor, keep_mask: torch.Tensor):
        """Run the method on every view; fill ``keep_mask`` in place. Returns (embeds, records)."""
        layouts = self.image_layouts(images)
        image_mask = self._image_token_mask(call, embeds)
        rows, cols = image_mask.nonzero(as_tuple=True)  # row-major: the order features were scattered
        expected = sum(lay.num_tokens for lay in layouts)
        if rows.numel() != expected:
            raise RuntimeError(
                f"found {rows.numel()} image placeholder tokens but the images give {expected}"
            )
        offset = self.patch_offset()
        config = self.state.config
        new_embeds = embeds
        records: list[ImageRecord] = []
        start = 0
        for lay in layouts:
            n = lay.num_tokens
            sample = int(rows[start])
            pos = cols[start : start + n]
            if not bool((rows[start : start + n] == sample).all()):
                raise RuntimeError("an image's placeholder tokens span two prompts")
            start += n
            h, w = lay.grid
            n_patch = h * w
            token_view = lay.token_view.to(embeds.device)
            token_patch = lay.token_patch.to(embeds.device)
            prunable = token_view >= 0
            caps = [int((token_view == v).sum()) for v in range(len(lay.views))]
            budget = config.budget(int(prunable.sum()))
            shares = split_budget(budget, caps)
            kept = ~prunable
            scores = {"score": torch.full((n,), float("nan"), device=embeds.device)}
            for v, vid in enumerate(lay.views):
                here = token_view == v
                valid = torch.zeros(n_patch, dtype=torch.bool, device=embeds.device)
                valid[token_patch[here]] = True
                signals = {
                    key: stats[vid, offset : offset + n_patch].to(embeds.device)
                    for key, stats in self.state._signals.items()
                }
                features = None
                if self.method.needs_features:
                    features = embeds.new_zeros(n_patch, embeds.shape[-1])
                    features[token_patch[here]] = embeds[sample, pos[here]]
                view = View(
                    grid=(h, w), budget=shares[v], valid=valid, signals=signals, features=features, index=v
                )
                sel = self.method.select(view)
                keep_patch = torch.zeros(n_patch, dtype=torch.bool, device=embeds.device)
                keep_patch[sel.keep.to(embeds.device)] = True
                kept |= here & keep_patch[token_patch.clamp(min=0)]
                if sel.score is not None:
                    scores["score"][here] = sel.score.to(embeds.device).float()[token_patch[here]]
                if sel.assign is not None:
                    new_embeds = self._merge(
                        new_embeds, sample, pos[here], token_patch[here], sel.assign, features
                    )
            keep_mask[sample, pos] = kept
            records.append(
                ImageRecord(
                    sample=sample,
                    positions=pos,
                    kept=kept,
                    scores=scores,
                    budget=budget,
                    grids=[lay.grid] * len(lay.views),
                    merged=new_embeds[sample, pos[kept]].detach() if self.method.needs_features else None,
                )
            )
        return new_embeds, records

    @staticmethod
    def _merge(embeds, sample, pos, patches, assign, features):
        """Replace each kept representative's row by the mean of the patches assigned to it."""
        assign = assign.to(embeds.device)
        n_patch, dim = features.shape
        target = assign.clamp(min=0)
        sums = torch.zeros(n_patch, dim, dtype=torch.float32, device=embeds.device)
        sums.index_add_(0, target[assign >= 0], features[assign >= 0].float())
        count = torch.zeros(n_patch, device=embeds.device).index_add_(
            0, target[assign >= 0], torch.ones_like(target[assign >= 0], dtype=torch.float32)
        )
        reps = count[patches] > 0
        embeds = embeds.clone()
        embeds[sample, pos[reps]] = (sums[patches[reps]] / count[patches[reps], None]).to(embeds.dtype)
        return embeds
