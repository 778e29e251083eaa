"""pdrop: PyramidDrop — at layers 8, 16, 24 (of 32) keep lambda of the previous stage, ranked by the
last instruction token's attention in the first layer after the cut.

As the reference (``modeling_llama_pdrop.py``, ``pdrop_rank_drop``): after layer K-1 has run, layer
K's ``input_layernorm``, q/k projections and RoPE are applied to the uncut sequence, and the vision
tokens are ranked by the last prompt token's row of that attention, head mean. Kept counts are
``int(n * fraction)`` of the prompt's original vision tokens, as the reference computes them.
"""

from __future__ import annotations

from . import register
from .llm import LLMMethod, scaled_layer, solve_scale


@register("pdrop")
class PyramidDrop(LLMMethod):
    description = "in-LLM: PyramidDrop, keep lambda of the tokens at each stage by the last instruction token's attention"
    defaults = {
        "layers": (8, 16, 24),  # cut layers on a 32-layer LLM, scaled to the model's depth
        "schedule": None,
        "score_dtype": None,  # None: rank fp32 scores; "float16" as the reference's fp16 attention
    }
    preset_positions = "compact"
    instruction_query = "last"

    def __init__(self, **options):
        super().__init__(**options)
        layers = self.options["layers"]
        if not isinstance(layers, (list, tuple)) or not layers or not all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in layers
        ):
            raise ValueError(f"pdrop option layers={layers!r} must be a non-empty list of ints >= 1")
        self.check_common()

    def solve(self, num_layers, keep):
        layers = sorted({scaled_layer(layer, num_layers) for layer in self.options["layers"]})

        def make(lam):
            return [(layer, lam ** (i + 1)) for i, layer in enumerate(layers)]

        return solve_scale(make, num_layers, keep, name="pdrop")

    def instruction_attention(self):
        return True

    def kept_count(self, fraction, n):
        return int(n * fraction)

    def score(self, stage, layer, signals):
        return self.cast(signals[f"iga@{layer}"])
