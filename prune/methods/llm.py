"""Shared parts of the methods that prune inside the language model (FastV, TransPrune, PyramidDrop).

These methods drop vision tokens between decoder layers: layers before a cut see every token, later
layers see fewer. ``keep`` is the average fraction of vision tokens per LLM layer (the equal-FLOPs
convention of PyramidDrop / SparseVLM); each method solves it into a schedule
``[(layer, fraction), ...]`` (fractions of the original vision tokens, from that layer on), and an
explicit ``schedule=`` option overrides it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .base import Method


def average_fraction(schedule: list[tuple[int, float]], num_layers: int) -> float:
    """Mean over layers of the fraction of vision tokens each layer sees."""
    total, current, start = 0.0, 1.0, 0
    for layer, fraction in sorted(schedule):
        total += (layer - start) * current
        start, current = layer, fraction
    total += (num_layers - start) * current
    return total / num_layers


def solve_scale(
    make, num_layers: int, keep: float, hi: float = 1.0, name: str = "this method"
) -> list[tuple[int, float]]:
    """Bisection on c in [0, hi] so that ``make(c)`` (a schedule, increasing in c) averages ``keep``.
    Raises when even ``make(0)`` (every vision token dropped at the first cut) averages ``keep`` or
    more: the layers before the first cut alone see that much, and the layers after the cut would
    see no vision token at all."""
    lo = 0.0
    floor = average_fraction(make(0.0), num_layers)
    if floor >= keep - 1e-9:
        raise ValueError(below_floor(name, keep, num_layers, min(layer for layer, _ in make(0.0)), floor))
    if average_fraction(make(hi), num_layers) < keep:
        return make(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if average_fraction(make(mid), num_layers) < keep:
            lo = mid
        else:
            hi = mid
    return make(hi)


def below_floor(name: str, keep: float, num_layers: int, first: int, floor: float) -> str:
    return (
        f"{name} cannot average keep={keep} on {num_layers} layers: the first {first} layers (before its "
        f"first cut) alone see {floor:.3f}, and at keep <= {floor:.3f} the layers after the cut would see no "
        "vision token; raise keep above it or pass schedule=[(layer, fraction), ...]"
    )


def scaled_layer(layer: int, num_layers: int, reference_depth: int = 32) -> int:
    """A reference layer index (on a 32-layer LLM) on a model of another depth (at least 1)."""
    return max(1, min(num_layers - 1, round(layer * num_layers / reference_depth)))


def validate_schedule(schedule: Any, num_layers: int) -> list[tuple[int, float]]:
    try:
        items = [(int(layer), float(fraction)) for layer, fraction in schedule]
    except (TypeError, ValueError):
        raise ValueError("schedule must be a list of (layer, fraction) pairs") from None
    previous_layer, previous = 0, 1.0
    for layer, fraction in sorted(items):
        if not 1 <= layer < num_layers:
            raise ValueError(f"schedule layer {layer} must be in [1, {num_layers - 1}] for a {num_layers}-layer LLM")
        if layer == previous_layer:
            raise ValueError(f"schedule lists layer {layer} twice")
        if not 0.0 <= fraction <= previous:
            raise ValueError(f"schedule fractions must not grow: {fraction} after {previous} at layer {layer}")
        previous_layer, previous = layer, fraction
    return sorted(items)


class LLMMethod(Method):
    """Base of in-LLM methods. Subclasses give the schedule and the per-stage score."""

    in_llm: ClassVar[bool] = True
    #: position mode of the reference implementation (None: the family's preset)
    preset_positions: ClassVar[str | None] = None

    #: query rows of the instruction attention: "all" instruction tokens (TransPrune) or the "last" (PyramidDrop)
    instruction_query: ClassVar[str] = "all"

    def explicit(self, num_layers: int) -> list[tuple[int, float]] | None:
        """A schedule the options fix without ``keep`` (``schedule=``), else None."""
        if self.options.get("schedule") is not None:
            return validate_schedule(self.options["schedule"], num_layers)
        return None

    def schedule(self, num_layers: int, keep: float | int) -> list[tuple[int, float]]:
        fixed = self.explicit(num_layers)
        if fixed is not None:
            if isinstance(keep, float) and keep >= 1.0 and any(f < 1.0 for _, f in fixed):
                given = "ratio" if self.options.get("schedule") is None else "schedule"
                raise ValueError(
                    f"{self.name}: keep=1.0 keeps every vision token but {given}={self.options[given]!r} drops "
                    f"some; pass keep below 1.0 or leave {given} unset (with {given}, keep is not used otherwise)"
                )
            return fixed
        if not isinstance(keep, float):
            raise ValueError(
                f"{self.name} reads keep as the average fraction of vision tokens per LLM layer (a float); "
                "pass schedule=[(layer, fraction), ...] for explicit counts"
            )
        if keep >= 1.0:
            return []
        return self.solve(num_layers, keep)

    def solve(self, num_layers: int, keep: float) -> list[tuple[int, float]]:
        raise NotImplementedError

    def min_keep(self, num_layers: int) -> float:
        """The floor of ``keep`` on this depth: the share the layers before the first cut see
        (``keep`` must be above it)."""
        first = self.solve(num_layers, 1.0 - 1e-9)[0][0]
        return first / num_layers

    def kept_count(self, fraction: float, n: int) -> int:
        """Vision tokens a stage keeps of a prompt's ``n``: ``round`` (FastV); PyramidDrop and
        TransPrune override it with their references' ``int(n * ratio)``."""
        return round(fraction * n)

    def cast(self, score: torch.Tensor) -> torch.Tensor:
        """The score in the dtype the option ``score_dtype`` names (None: fp32)."""
        from .base import cast_scores

        return cast_scores(score, self.options.get("score_dtype"))

    def check_common(self) -> None:
        from .base import SCORE_DTYPES, check_option

        check_option(self.name, "score_dtype", self.options.get("score_dtype"), choices=tuple(SCORE_DTYPES))

    # Signals: which decoder layers' attention of the last token, and which layers' transitions.
    def last_token_layers(self, schedule: list[tuple[int, float]]) -> list[int]:
        return []

    def transition_layers(self, schedule: list[tuple[int, float]], num_layers: int) -> list[int]:
        return []

    def instruction_attention(self) -> bool:
        return False

    def score(self, stage: int, layer: int, signals: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L_stage) score of every row of the current sequence (only vision rows are read)."""
        raise NotImplementedError
