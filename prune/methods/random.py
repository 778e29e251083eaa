"""random: a uniform random subset per view (the baseline every report includes)."""

from __future__ import annotations

import torch

from . import register
from .base import Method, Selection, View


@register("random")
class RandomPrune(Method):
    description = "uniform random subset of each image's tokens (seeded baseline)"
    host_select = True  # shapes and the seed only: computed on the host, copied once
    defaults = {"seed": 0}
    option_ranges = {"seed": (0, None)}

    def select(self, view: View) -> Selection:
        # One generator per (seed, view number): the choice depends on neither the batch nor the
        # order of calls, so a batch equals its single calls and reruns are reproducible.
        gen = torch.Generator().manual_seed(int(self.options["seed"]) * 1_000_003 + view.index)
        candidates = torch.nonzero(view.valid.cpu(), as_tuple=True)[0]
        order = torch.randperm(candidates.numel(), generator=gen)
        keep = candidates[order[: view.budget]].sort().values
        return Selection(keep=keep.to(view.valid.device))
