"""fastv: at decoder layer K drop the vision tokens the last prompt token attends to least (FastV)."""

from __future__ import annotations

from . import register
from .base import check_option
from .llm import LLMMethod, below_floor


@register("fastv")
class FastV(LLMMethod):
    description = "in-LLM: drop vision tokens with the least last-token attention at layer K (FastV)"
    defaults = {
        "layer": 2,  # K: layers >= K see the kept tokens; the score is layer K-1's attention
        # R, fraction of vision tokens dropped at K; given, (K, R) is the schedule and keep is not used
        # (keep=1.0 with R > 0 is refused); None = solved from keep
        "ratio": None,
        "schedule": None,
        "score_dtype": None,  # None: rank fp32 scores; "float16"/"bfloat16": round them first (ties)
    }
    option_ranges = {"layer": (1, None), "ratio": (0.0, 1.0)}
    option_types = {"ratio": float}
    preset_positions = "original"

    def __init__(self, **options):
        super().__init__(**options)
        check_option("fastv", "layer", self.options["layer"], kind=int, low=1)
        check_option("fastv", "ratio", self.options["ratio"], kind=(int, float), low=0.0, high=1.0, optional=True)
        if self.options["ratio"] is not None and self.options["ratio"] >= 1.0:
            raise ValueError("fastv option ratio=1.0 would leave the layers after the cut no vision token; use ratio < 1")
        if self.options["ratio"] is not None and self.options["schedule"] is not None:
            raise ValueError("fastv: pass ratio (with layer) or schedule, not both")
        self.check_common()

    def _layer(self, num_layers):
        k = int(self.options["layer"])
        if not 1 <= k < num_layers:
            raise ValueError(f"fastv layer={k} must be in [1, {num_layers - 1}]")
        return k

    def explicit(self, num_layers):
        if self.options["ratio"] is not None:
            return [(self._layer(num_layers), 1.0 - float(self.options["ratio"]))]
        return super().explicit(num_layers)

    def solve(self, num_layers, keep):
        k = self._layer(num_layers)
        # keep = (K + (L - K) * (1 - R)) / L
        fraction = (keep * num_layers - k) / (num_layers - k)
        if fraction <= 1e-9:
            raise ValueError(below_floor("fastv", keep, num_layers, k, k / num_layers) + "; or lower layer=")
        return [(k, min(1.0, fraction))]

    def last_token_layers(self, schedule):
        return [layer - 1 for layer, _ in schedule]

    def score(self, stage, layer, signals):
        return self.cast(signals[f"last@{layer - 1}"])
