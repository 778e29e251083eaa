"""fastv: at decoder layer K drop the vision tokens the last prompt token attends to least (FastV)."""

from __future__ import annotations

from . import register
from .llm import LLMMethod


@register("fastv")
class FastV(LLMMethod):
    description = "in-LLM: drop vision tokens with the least last-token attention at layer K (FastV)"
    defaults = {
        "layer": 2,  # K: layers >= K see the kept tokens; the score is layer K-1's attention
        "ratio": None,  # R, fraction of vision tokens dropped; None = solved from keep
        "schedule": None,
    }
    option_ranges = {"layer": (1, None), "ratio": (0.0, 1.0)}
    option_types = {"ratio": float}
    preset_positions = "original"

    def solve(self, num_layers, keep):
        k = int(self.options["layer"])
        if not 1 <= k < num_layers:
            raise ValueError(f"fastv layer={k} must be in [1, {num_layers - 1}]")
        if self.options["ratio"] is not None:
            return [(k, 1.0 - float(self.options["ratio"]))]
        # keep = (K + (L - K) * (1 - R)) / L
        fraction = (keep * num_layers - k) / (num_layers - k)
        if fraction < 0:
            raise ValueError(
                f"fastv cannot average keep={keep} with layer={k} of {num_layers}: the first {k} layers alone "
                f"see {k / num_layers:.2f}; lower layer= or raise keep"
            )
        return [(k, fraction)]

    def last_token_layers(self, schedule):
        return [layer - 1 for layer, _ in schedule]

    def score(self, stage, layer, signals):
        return signals[f"last@{layer - 1}"]
