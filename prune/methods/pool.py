"""pool: spatial average pooling of the patch grid to about the budget (a merging baseline)."""

from __future__ import annotations

import torch

from . import register
from .base import Method, Selection, View


def pooled_grid(h: int, w: int, budget: int) -> tuple[int, int]:
    """Output grid (oh, ow) whose cell count is the closest to ``budget`` with the view's aspect."""
    best = (1, 1)
    for oh in range(1, h + 1):
        ow = max(1, min(w, round(budget / oh)))
        if abs(oh * ow - budget) < abs(best[0] * best[1] - budget) or (
            abs(oh * ow - budget) == abs(best[0] * best[1] - budget)
            and abs(oh / ow - h / w) < abs(best[0] / best[1] - h / w)
        ):
            best = (oh, ow)
    return best


@register("pool")
class PoolPrune(Method):
    description = "average-pool the patch grid into about T cells (merges, does not drop)"
    host_select = True  # shapes and the seed only: computed on the host, copied once
    defaults = {}
    needs_features = True

    def select(self, view: View) -> Selection:
        h, w = view.grid
        valid = view.valid
        n_valid = int(valid.sum())
        # Pool the bounding box of the valid patches (anyres crops are unpadded rectangles).
        rows = torch.nonzero(valid.view(h, w).any(1), as_tuple=True)[0]
        cols = torch.nonzero(valid.view(h, w).any(0), as_tuple=True)[0]
        r0, r1, c0, c1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        bh, bw = r1 - r0, c1 - c0
        budget = min(view.budget, n_valid)
        oh, ow = pooled_grid(bh, bw, budget) if budget < bh * bw else (bh, bw)
        # Cell (i, j) covers rows [floor(i*bh/oh), floor((i+1)*bh/oh)): a partition, no overlap.
        row_cell = (torch.arange(bh) * oh) // bh
        col_cell = (torch.arange(bw) * ow) // bw
        cell = torch.full((h, w), -1, dtype=torch.long)
        cell[r0:r1, c0:c1] = row_cell[:, None] * ow + col_cell[None, :]
        cell = cell.view(-1).to(valid.device).masked_fill(~valid, -1)
        # The representative of a cell is its first valid patch in raster order (its position).
        n_cells = oh * ow
        big = h * w
        first = torch.full((n_cells,), big, dtype=torch.long, device=valid.device)
        idx = torch.arange(big, device=valid.device)
        first.scatter_reduce_(0, cell.clamp(min=0), torch.where(cell >= 0, idx, big), reduce="amin")
        rep = first[first < big]
        assign = torch.where(cell >= 0, first[cell.clamp(min=0)], torch.full_like(cell, -1))
        return Selection(keep=rep.sort().values, assign=assign)


__all__ = ["PoolPrune", "pooled_grid"]
