"""cls: keep the patches the [CLS] token attends to most (FasterVLM; VTC-CLS layer ensemble)."""

from __future__ import annotations

from . import register
from .base import EncoderInfo, Method, Selection, SignalRequest, View, layer_index, stable_topk


@register("cls")
class ClsPrune(Method):
    description = "[CLS] attention of the feature layer (FasterVLM) or summed over layers (VTC-CLS)"
    defaults = {
        "variant": "fastervlm",  # "fastervlm": one layer; "vtc": sum over layers [start, L-1)
        "layer": None,  # fastervlm layer (0-based); None = the layer LLaVA takes features from
        "start": None,  # vtc first layer; None = 2/3 of the depth (16 on the 24-layer CLIP-L)
    }
    option_choices = {"variant": ("fastervlm", "vtc")}
    option_types = {"layer": int, "start": int}
    needs_cls = True

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["variant"] not in ("fastervlm", "vtc"):
            raise ValueError(f"cls variant must be 'fastervlm' or 'vtc', got {self.options['variant']!r}")

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
        score = sum(view.signals.values())
        keep = stable_topk(score, view.budget, view.valid).sort().values
        return Selection(keep=keep, score=score)
