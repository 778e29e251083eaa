"""hiprune: anchors from an object-centric middle layer, their spatial buffers, and registers
from a deep layer (HiPrune). Needs no [CLS] token."""

from __future__ import annotations

import torch

from . import register
from .base import (
    SCORE_DTYPES,
    BatchSelection,
    EncoderInfo,
    Method,
    Selection,
    SignalRequest,
    View,
    ViewBatch,
    cast_scores,
    check_option,
    layer_index,
    stable_topk,
    stable_topk_mask,
    stable_topk_rows,
)


@register("hiprune")
class HiPrune(Method):
    description = "hierarchical attention: object-layer anchors + neighbour buffers + deep-layer registers"
    defaults = {
        "alpha": 0.1,  # anchors = round(T * alpha / 5)
        "object_layer": None,  # 0-based; None = round(object_ratio * depth) - 1
        "object_ratio": 0.375,  # 9/24: the reference's OBJECT_LAYER=9 of CLIP-L; Qwen preset 0.5 (block 15 of 32)
        "deep_layer": None,  # 0-based; None = the layer the LLM takes features from
        "wrap_rows": True,  # reference: the +-1 buffer wraps to the neighbouring row; False stops at edges
        # "exact": registers never repeat an anchor/buffer, the image keeps exactly T. "reference": the
        # reference's subtraction of 1 from the deep attention of anchors/buffers (summed over queries
        # on Qwen, so a strong one is picked again and the image keeps fewer than T)
        "exclusion": "exact",
        # LLaVA-NeXT: "even" splits T over the views (what a view cannot take goes to the others);
        # "floor": int(T / views) each, the remainder lost (the reference's fork)
        "views": "even",
        "score_dtype": None,  # None: rank fp32 scores; "float16"/"bfloat16": round them first (ties)
        # "post_encoder": select after the vision encoder. "encoder": select right after the object layer
        # and run the later encoder layers on the kept rows only; the deep layer comes after that cut, so
        # registers are taken from the object layer's attention too (unless deep_layer is given: then the
        # cut follows the later of the two layers)
        "stage": "post_encoder",
    }
    option_choices = {"stage": ("post_encoder", "encoder")}
    option_ranges = {"alpha": (0.0, 5.0), "object_ratio": (0.0, 1.0)}
    option_types = {"object_layer": int, "deep_layer": int}
    option_notes = {
        "stage": "'encoder': drop rows right after the object layer, the later encoder layers run on the kept "
        "rows only; registers then come from the object layer's attention (the deep layer is after the cut), "
        "or from deep_layer if given (the cut follows the later of the two)",
    }

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        check_option("hiprune", "alpha", o["alpha"], kind=(int, float), low=0.0, high=5.0)
        check_option("hiprune", "object_layer", o["object_layer"], kind=int, optional=True)
        check_option("hiprune", "object_ratio", o["object_ratio"], kind=(int, float), low=0.0, high=1.0)
        check_option("hiprune", "deep_layer", o["deep_layer"], kind=int, optional=True)
        check_option("hiprune", "wrap_rows", o["wrap_rows"], kind=bool)
        check_option("hiprune", "exclusion", o["exclusion"], choices=("exact", "reference"))
        check_option("hiprune", "views", o["views"], choices=("even", "floor"))
        check_option("hiprune", "score_dtype", o["score_dtype"], choices=tuple(SCORE_DTYPES))
        if o["stage"] == "encoder" and o["exclusion"] != "exact":
            raise ValueError(
                "hiprune option stage='encoder' needs exclusion='exact' (every image keeps exactly its budget "
                "inside the encoder batch)"
            )

    def layers(self, encoder: EncoderInfo) -> tuple[int, int]:
        obj, deep = self.options["object_layer"], self.options["deep_layer"]
        if obj is None:
            obj = max(0, round(float(self.options["object_ratio"]) * encoder.num_layers) - 1)
        obj = layer_index(obj, encoder.num_layers, "object_layer")
        if deep is None:  # encoder stage: the feature layer comes after the cut; the object layer stands in
            deep = obj if self.options["stage"] == "encoder" else encoder.feature_layer
        else:
            deep = layer_index(deep, encoder.num_layers, "deep_layer")
        return obj, deep

    def signals(self, encoder: EncoderInfo) -> list[SignalRequest]:
        obj, deep = self.layers(encoder)
        # The reference's Qwen path sums the deep attention over queries (mean 1.0 per token) and its
        # LLaVA path averages it (CLS encoders): "reference" exclusion subtracts 1 on that scale.
        deep_query = "sum" if self.options["exclusion"] == "reference" and not encoder.has_cls else "all"
        return list(dict.fromkeys([SignalRequest(obj), SignalRequest(deep, deep_query)]))  # one if the same

    def select(self, view: View) -> Selection:
        shallow, deep = (cast_scores(view.signals[r.key], self.options["score_dtype"])
                         for r in (self.requests[0], self.requests[-1]))
        h, w = view.grid
        n = h * w
        budget = view.budget
        n_anchor = round(budget * float(self.options["alpha"]) / 5)
        anchors = stable_topk(shallow, n_anchor, view.valid)
        # Buffers: +-1 (same row unless wrap_rows) and +-w, clamped to the grid as the reference does.
        cand = [anchors, anchors - w, anchors + w]
        if self.options["wrap_rows"]:
            cand += [anchors - 1, anchors + 1]
        else:
            col = anchors % w
            cand += [anchors[col > 0] - 1, anchors[col < w - 1] + 1]
        picked = torch.zeros(n, dtype=torch.bool, device=view.valid.device)
        picked[torch.cat(cand).clamp(0, n - 1)] = True
        picked &= view.valid
        if int(picked.sum()) > budget:  # only with a large alpha: keep the anchors, then buffers in order
            keep_first = stable_topk(
                picked.float() + 0.5 * torch.isin(torch.arange(n, device=picked.device), anchors), budget
            )
            picked = torch.zeros_like(picked)
            picked[keep_first] = True
        wanted = budget - int(picked.sum())
        if self.options["exclusion"] == "reference":
            # deep - 1 on anchors/buffers, all valid tokens candidates: one picked again is lost
            registers = stable_topk(deep - picked.float(), wanted, view.valid)
        else:
            registers = stable_topk(deep, wanted, view.valid & ~picked)
        picked[registers] = True
        keep = torch.nonzero(picked, as_tuple=True)[0]
        return Selection(keep=keep, score=deep)

    def select_batch(self, batch: ViewBatch) -> BatchSelection:
        """:meth:`select` for all views at once, on the device: anchors by one top-k, buffers by a
        scatter, registers by one top-k whose per-view count stays on the device."""
        shallow, deep = (cast_scores(batch.signals[r.key], self.options["score_dtype"])
                         for r in (self.requests[0], self.requests[-1]))  # one request when the layers agree
        views, width = shallow.shape
        valid, budgets = batch.valid, batch.budgets
        alpha = float(self.options["alpha"])
        n_anchor = [round(b * alpha / 5) for b in budgets]
        anchors, take = stable_topk_rows(shallow, n_anchor, valid)  # (V, A) rank order
        w = batch.column([gw for _, gw in batch.grids])  # (V, 1)
        last = batch.column([gh * gw - 1 for gh, gw in batch.grids])
        # Buffers: +-1 (same row unless wrap_rows) and +-w, clamped to the view's grid; column
        # ``width`` is a dump for the anchors a view does not take
        cand = [anchors, anchors - w, anchors + w]
        if self.options["wrap_rows"]:
            cand += [anchors - 1, anchors + 1]
            ok = [take] * 5
        else:
            col = anchors % w
            cand += [anchors - 1, anchors + 1]
            ok = [take] * 3 + [take & (col > 0), take & (col < w - 1)]
        cand = torch.cat([torch.minimum(c.clamp(min=0), last) for c in cand], 1)
        cand = torch.where(torch.cat(ok, 1), cand, width)
        picked = torch.zeros(views, width + 1, dtype=torch.bool, device=valid.device)
        picked = picked.scatter_(1, cand, True)[:, :width] & valid
        if any(5 * a > b for a, b in zip(n_anchor, budgets)):  # a large alpha may pick more than T
            is_anchor = torch.zeros_like(picked).scatter_(1, anchors, take)
            first = stable_topk_mask(picked.float() + 0.5 * is_anchor.float(), budgets)
            over = picked.sum(1, keepdim=True) > batch.column(budgets)
            picked = torch.where(over, first, picked)
        wanted = batch.column(budgets) - picked.sum(1, keepdim=True)  # (V, 1) on the device
        kmax = max(budgets, default=0)
        if self.options["exclusion"] == "reference":
            registers = stable_topk_mask(deep - picked.float(), wanted, valid, kmax=kmax)
            counts = None  # a register that repeats an anchor/buffer is lost: a data-dependent count
        else:
            registers = stable_topk_mask(deep, wanted, valid & ~picked, kmax=kmax)
            counts = list(budgets)
        return BatchSelection(keep=picked | registers, counts=counts, score=deep)
