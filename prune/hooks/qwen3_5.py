"""Qwen3.5 (Qwen3_5ForConditionalGeneration): Qwen3-VL's vision side without DeepStack (2x2 merge
units, full attention in every vision block, timestamp text between a video's temporal slices) and a
language model that mixes gated-DeltaNet linear-attention layers with full-attention layers
(``layer_types``).

Vision-side methods cut the language model's input once, before any layer runs: the recurrent
(conv and delta-rule) states are then built from the kept tokens only, exactly as the unwrapped
model run on the reduced sequence builds them, and decoding continues from them. In-LLM methods
(fastv, pdrop, transprune) are refused at wrap time: a cut between layers would have to remove the
dropped tokens' contributions from every linear-attention layer's recurrent state, which already
summarises them; the decoder cut handles KV caches of full-attention layers only.
"""

from __future__ import annotations

from .qwen2_vl import Qwen2VLAdapter


class Qwen35Adapter(Qwen2VLAdapter):
    family = "qwen3_5"
    model_classes = ("Qwen3_5ForConditionalGeneration",)

    def install(self, state, method) -> None:
        if getattr(method, "in_llm", False):
            types = sorted(set(getattr(self.language_model().config, "layer_types", None) or []))
            raise ValueError(
                f"{method.name} (an in-LLM method) is not supported on Qwen3.5: its language model mixes "
                f"{' and '.join(types)} layers, and a cut between layers cannot remove dropped tokens from the "
                "linear-attention layers' recurrent state; use a vision-side method (random, pool, hiprune)"
            )
        super().install(state, method)
