"""avpool's pieces on hand-made pools (no model): co-attention, lift, floors, budgets."""

import pytest
import torch

from prune.methods import View, get_method
from prune.methods.avpool import AVPool, co_attention, floor_then_top, lift, prompt_attention


def _pool(n_video=(12, 7), n_audio=(5, 0, 4), dim=16, seed=0):
    """Video tokens in windows 0..len(n_video)-1, audio in windows 0..len(n_audio)-1, interleaved
    window by window as the Omni processor does; a window may lack a modality."""
    gen = torch.Generator().manual_seed(seed)
    modality, window = [], []
    for w in range(max(len(n_video), len(n_audio))):
        for m, counts in ((0, n_video), (1, n_audio)):
            c = counts[w] if w < len(counts) else 0
            modality += [m] * c
            window += [w] * c
    n = len(modality)
    return torch.randn(n, dim, generator=gen), torch.tensor(modality), torch.tensor(window)


def _reference_co_attention(features, modality, window, temperature):
    """Explicit per-window cross-modal softmax (falls back to the window's own tokens)."""
    x = torch.nn.functional.normalize(features.double(), dim=-1)
    out = torch.zeros(len(x), dtype=torch.float64)
    for w in window.unique():
        idx = torch.nonzero(window == w, as_tuple=True)[0]
        for i in idx:
            keys = idx[modality[idx] != modality[i]]
            if keys.numel() == 0:
                keys = idx
            p = torch.softmax(x[keys] @ x[i] / temperature, dim=0)
            out[keys] += p
    return (out / len(x)).float()


@pytest.mark.parametrize("temperature", [0.1, 1.0])
def test_co_attention_is_cross_modal_softmax_per_window(temperature):
    features, modality, window = _pool()
    got = co_attention(features, modality, window, temperature)
    torch.testing.assert_close(got, _reference_co_attention(features, modality, window, temperature),
                               atol=1e-6, rtol=1e-5)
    # every query's unit of attention goes to the other modality of its window (its own when alone):
    # window 0 has 12 video + 5 audio, window 1 only 7 video, window 2 only 4 audio
    n = len(modality)
    groups = [(0, 0), (1, 0), (0, 1), (1, 2)]
    mass = {(m, w): float(got[(modality == m) & (window == w)].sum() * n) for m, w in groups}
    assert mass == pytest.approx({(0, 0): 5.0, (1, 0): 12.0, (0, 1): 7.0, (1, 2): 4.0}, abs=1e-4)


def test_lift_is_one_on_average_per_group():
    features, modality, window = _pool()
    group = modality * 10 + window
    value = lift(co_attention(features, modality, window, 0.1), group)
    for g in group.unique():
        assert abs(float(value[group == g].mean()) - 1.0) < 1e-5


def test_prompt_attention_ignores_prompt_keys():
    features, modality, window = _pool()
    prompt = torch.randn(3, features.shape[1], generator=torch.Generator().manual_seed(1))
    got = prompt_attention(features, prompt, 0.2)
    x = torch.nn.functional.normalize(features, dim=-1)
    p = torch.nn.functional.normalize(prompt, dim=-1)
    ref = torch.softmax(p @ x.T / 0.2, dim=-1).mean(0)
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


def test_floor_then_top_serves_rounds_then_scores():
    score = torch.tensor([9.0, 8.0, 7.0, 1.0, 0.5, 6.0, 5.0, 0.1])
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3])
    # floors fit: every group keeps its best, then the best of the rest
    assert floor_then_top(score, group, 6, 1).tolist() == [0, 1, 2, 3, 5, 7]
    # floors exceed the budget: round 0 of every group, best first
    assert floor_then_top(score, group, 3, 2).tolist() == [0, 3, 5]
    assert floor_then_top(score, group, 5, 2).tolist() == [0, 1, 3, 5, 7]
    # no floor: plain top-k; ties go to the lower index
    assert floor_then_top(torch.zeros(5), torch.zeros(5, dtype=torch.long), 2, 0).tolist() == [0, 1]
    assert floor_then_top(score, group, 0, 1).tolist() == []


@pytest.mark.parametrize("budget", ["joint", "per_modality"])
def test_select_pool_budgets(budget):
    features, modality, window = _pool(n_video=(30, 20), n_audio=(10, 10))
    counts = [int((modality == m).sum()) for m in (0, 1)]
    method = get_method("avpool")(budget=budget)
    pool = AVPool(features=features, modality=modality, window=window, budget=14,
                  modality_budgets=(round(0.2 * counts[0]), round(0.2 * counts[1])))
    sel = method.select_pool(pool)
    keep = sel.keep
    assert keep.tolist() == sorted(set(keep.tolist()))
    if budget == "joint":
        assert keep.numel() == 14
    else:
        assert [int((modality[keep] == m).sum()) for m in (0, 1)] == [10, 4]
    for m in (0, 1):
        for w in (0, 1):
            assert ((modality[keep] == m) & (window[keep] == w)).any()
    assert sel.score.shape == (len(modality),) and torch.isfinite(sel.score).all()


def test_select_on_an_image_view():
    method = get_method("avpool")()
    valid = torch.ones(24, dtype=torch.bool)
    valid[5:9] = False
    features = torch.randn(24, 16, generator=torch.Generator().manual_seed(3)) * valid[:, None]
    sel = method.select(View(grid=(4, 6), budget=7, valid=valid, features=features))
    assert sel.keep.numel() == 7 and valid[sel.keep].all()
    assert torch.isnan(sel.score[~valid]).all() and torch.isfinite(sel.score[valid]).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the Triton attention_stats path)")
def test_co_attention_on_cuda_matches_cpu():
    features, modality, window = _pool(n_video=(300, 200, 90), n_audio=(50, 50), dim=64)
    cpu = co_attention(features, modality, window, 0.1)
    gpu = co_attention(features.cuda(), modality.cuda(), window.cuda(), 0.1).cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-7, rtol=1e-3)
    method = get_method("avpool")()
    pool = AVPool(features=features, modality=modality, window=window, budget=100, modality_budgets=(59, 20))
    on_gpu = AVPool(features=features.cuda(), modality=modality.cuda(), window=window.cuda(), budget=100,
                    modality_budgets=(59, 20))
    assert method.select_pool(on_gpu).keep.cpu().tolist() == method.select_pool(pool).keep.tolist()
