"""cls: keep the patches the [CLS] token attends to most (FasterVLM; VTC-CLS layer ensemble)."""

from __future__ import annotations

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
)


@register("cls")
class ClsPrune(Method):
    description = "[CLS] attention of the feature layer (FasterVLM) or summed over layers (VTC-CLS)"
    defaults = {
        "variant": "fastervlm",  # "fastervlm": one layer; "vtc": sum over layers [start, L-1)
        "layer": None,  # fastervlm layer (0-based); None = the layer LLaVA takes features from
        "start": None,  # vtc first layer; None = 2/3 of the depth (16 on the 24-layer CLIP-L)
        # LLaVA-NeXT: "even" splits T over the views (what a view cannot take goes to the others);
        # "floor": int(T / views) each (remainder lost); "per_view": every view keeps T of its grid
        # (FasterVLM's fork), so an image of V views keeps up to V * T
        "views": "even",
        "score_dtype": None,  # None: rank fp32 scores; "float16": FasterVLM's fp16 attention (ties)
        # "post_encoder": select after the vision encoder; "encoder": select right after the (last) CLS
        # layer and run the encoder's later layers on the kept rows only (prune.hooks.encoder_stage)
        "stage": "post_encoder",
    }
    option_choices = {"variant": ("fastervlm", "vtc"), "stage": ("post_encoder", "encoder")}
    option_types = {"layer": int, "start": int}
    option_notes = {
        "stage": "'encoder': drop rows right after the (last) CLS layer read, the later encoder layers run on "
        "the kept rows only; at the default layer (the feature layer) that saves only the layers after it",
    }
    needs_cls = True

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["variant"] not in ("fastervlm", "vtc"):
            raise ValueError(f"cls variant must be 'fastervlm' or 'vtc', got {self.options['variant']!r}")
        check_option("cls", "layer", self.options["layer"], kind=int, optional=True)
        check_option("cls", "start", self.options["start"], kind=int, optional=True)
        check_option("cls", "views", self.options["views"], choices=("even", "floor", "per_view"))
        check_option("cls", "score_dtype", self.options["score_dtype"], choices=tuple(SCORE_DTYPES))

    def layers(self, encoder: EncoderInfo) -> list[int]:
        if self.options["variant"] == "fastervlm":
            layer = self.options["layer"]
            return [
                encoder.feature_layer if layer is None else layer_index(layer, encoder.num_layers, "layer")
            ]
        start = self.options["start"]
        start = (
            round(encoder.num_layers * 2 / 3)
            if start is None
            else layer_index(start, encoder.num_layers, "start")
        )
        last = encoder.num_layers - 1  # VTC-CLS sums layers start .. L-2
        if start >= last:
            raise ValueError(
                f"cls start={start} leaves no layer before {last} on this {encoder.num_layers}-layer encoder"
            )
        return list(range(start, last))

    def signals(self, encoder: EncoderInfo) -> list[SignalRequest]:
        return [SignalRequest(layer, "cls") for layer in self.layers(encoder)]

    def select(self, view: View) -> Selection:
        score = cast_scores(sum(view.signals.values()), self.options["score_dtype"])
        keep = stable_topk(score, view.budget, view.valid).sort().values
        return Selection(keep=keep, score=score)

    def select_batch(self, batch: ViewBatch) -> BatchSelection:
        score = cast_scores(sum(batch.signals.values()), self.options["score_dtype"])  # (V, P)
        keep = stable_topk_mask(score, batch.budgets, batch.valid)
        return BatchSelection(keep=keep, counts=list(batch.budgets), score=score)
