"""transprune: token transition variation (TTV) plus instruction-guided attention (IGA) (TransPrune).

TTV of a layer: for the attention and the MLP sub-layer, ||out|| / ||in|| * softmax over the
sequence of (1 - cos(in, out)), where in is the sub-layer's (normed) input and out its output, as
the reference computes it; summed over sub-layers and over the accumulating layers so far. IGA:
attention of the instruction tokens (the text after the last vision token) to the vision tokens,
from the q and k of the first layer after the cut, for those rows only. score = TTV / sum + IGA / sum
over the vision tokens of the sample. ``use_attention=False`` ranks by TTV alone.
"""

from __future__ import annotations

from . import register
from .base import check_option
from .llm import LLMMethod, scaled_layer, solve_scale

REFERENCE = [(7, 0.875), (9, 0.625), (12, 0.125)]  # LLaVA-1.5-7B (32 layers)


@register("transprune")
class TransPrune(LLMMethod):
    description = "in-LLM: token transition variation + instruction attention (TransPrune)"
    defaults = {
        "use_attention": True,
        # 0-based (first, last) layers whose TTV accumulates; None = the reference's ranks 7..12 of 32
        # (0-based 6..11), scaled to the model's depth
        "accumulate": None,
        "schedule": None,
        "score_dtype": None,  # None: rank fp32 scores; "float16"/"bfloat16": round them first (ties)
    }
    preset_positions = "compact"

    def __init__(self, **options):
        super().__init__(**options)
        check_option("transprune", "use_attention", self.options["use_attention"], kind=bool)
        acc = self.options["accumulate"]
        if acc is not None and not (
            isinstance(acc, (list, tuple)) and len(acc) == 2 and all(isinstance(x, int) and x >= 0 for x in acc)
            and acc[0] <= acc[1]
        ):
            raise ValueError(f"transprune option accumulate={acc!r} must be (first, last) 0-based layers, first <= last")
        self.check_common()

    def kept_count(self, fraction, n):
        return int(n * fraction)  # the reference's int(n * ratio)

    def solve(self, num_layers, keep):
        """The reference schedule with its fractions scaled by one factor (1 at keep ~ 0.41, its average)."""
        stages = {}
        for layer, fraction in REFERENCE:
            stages.setdefault(scaled_layer(layer, num_layers), fraction)  # shallow models may merge stages

        def make(scale):
            return [(layer, min(1.0, f * scale)) for layer, f in sorted(stages.items())]

        return solve_scale(make, num_layers, keep, hi=1.0 / min(stages.values()), name="transprune")

    def transition_layers(self, schedule, num_layers):
        if self.options["accumulate"] is not None:
            first, last = (int(x) for x in self.options["accumulate"])
        else:  # reference ranks 7..12 are 1-based: 0-based layers 6..11 on 32 layers
            first, last = scaled_layer(7, num_layers) - 1, scaled_layer(12, num_layers) - 1
        return list(range(max(0, first), min(num_layers, last + 1)))

    def instruction_attention(self):
        return bool(self.options["use_attention"])

    def score(self, stage, layer, signals):
        ttv = signals["ttv"]
        score = ttv / ttv.sum(-1, keepdim=True).clamp_min(1e-8)
        if self.instruction_attention():
            iga = signals[f"iga@{layer}"]
            score = score + iga / iga.sum(-1, keepdim=True).clamp_min(1e-8)
        return self.cast(score)
