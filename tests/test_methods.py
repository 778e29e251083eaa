"""Method building blocks on hand-made views (no model)."""

import torch

from prune.hooks.base import split_budget
from prune.methods import View, get_method
from prune.methods.pool import pooled_grid


def _view(h, w, budget, valid=None, **signals):
    valid = torch.ones(h * w, dtype=torch.bool) if valid is None else valid
    return View(grid=(h, w), budget=budget, valid=valid, signals=signals, features=torch.randn(h * w, 3))


def test_split_budget_even_with_caps():
    assert split_budget(10, [100, 100, 100]) == [4, 3, 3]
    assert split_budget(10, [2, 100, 100]) == [2, 4, 4]
    assert split_budget(500, [5, 6]) == [5, 6]
    assert sum(split_budget(7, [3, 0, 9])) == 7


def test_random_is_reproducible_and_respects_validity():
    valid = torch.zeros(36, dtype=torch.bool)
    valid[:20] = True
    m = get_method("random")(seed=3)
    a = m.select(_view(6, 6, 8, valid)).keep
    b = m.select(_view(6, 6, 8, valid)).keep
    assert torch.equal(a, b) and a.numel() == 8 and bool(valid[a].all())
    assert torch.equal(a, a.sort().values)
    c = get_method("random")(seed=4).select(_view(6, 6, 8, valid)).keep
    assert not torch.equal(a, c)


def test_pool_partitions_grid_and_assigns_to_first_patch():
    sel = get_method("pool")().select(_view(4, 4, 4))
    assert sel.keep.tolist() == [0, 2, 8, 10]
    assert sel.assign.view(4, 4)[0].tolist() == [0, 0, 2, 2]
    assert pooled_grid(24, 24, 144) == (12, 12)
    oh, ow = pooled_grid(24, 24, 190)
    assert abs(oh * ow - 190) <= 10


def test_pool_only_merges_valid_patches():
    valid = torch.ones(16, dtype=torch.bool)
    valid.view(4, 4)[:, 3] = False  # an unpadded crop: last column gone
    sel = get_method("pool")().select(_view(4, 4, 4, valid))
    assert bool((sel.assign[~valid] == -1).all())
    assert bool(valid[sel.keep].all())


def test_hiprune_wrap_rows_option():
    # One anchor at the right edge of row 0 (index 3 of a 4x4 grid); registers prefer the end.
    from prune.methods.base import SignalRequest

    shallow = torch.zeros(16)
    shallow[3] = 1.0
    deep = torch.arange(16, dtype=torch.float)
    expected = {
        True: {3, 2, 4, 7, 0, 15},  # +1 wraps to row 1 (index 4); -4 clamps to 0 as the reference does
        False: {3, 2, 7, 0, 15, 14},
    }
    for wrap, want in expected.items():
        m = get_method("hiprune")(alpha=1.0, wrap_rows=wrap)
        m.requests = [SignalRequest(0), SignalRequest(1)]
        sel = m.select(_view(4, 4, 6, **{"all@0": shallow, "all@1": deep}))
        assert set(sel.keep.tolist()) == want
