"""pdrop: PyramidDrop — at layers 8, 16, 24 (of 32) keep lambda of the previous stage, ranked by the
last instruction token's attention."""

from __future__ import annotations

from . import register
from .llm import LLMMethod, scaled_layer, solve_scale


@register("pdrop")
class PyramidDrop(LLMMethod):
    description = "in-LLM: PyramidDrop, keep lambda of the tokens at each stage by last-token attention"
    defaults = {"layers": (8, 16, 24), "schedule": None}
    preset_positions = "compact"

    def solve(self, num_layers, keep):
        layers = sorted({scaled_layer(layer, num_layers) for layer in self.options["layers"]})

        def make(lam):
            return [(layer, lam ** (i + 1)) for i, layer in enumerate(layers)]

        return solve_scale(make, num_layers, keep, name="pdrop")

    def last_token_layers(self, schedule):
        return [layer - 1 for layer, _ in schedule]

    def score(self, stage, layer, signals):
        return signals[f"last@{layer - 1}"]
