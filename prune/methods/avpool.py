"""avpool: training-free joint audio-visual pool (after EchoingPixels' idea of one combined pool).

The unit is a *pool*: the audio and video tokens of one video with its audio track (Qwen2.5-Omni's
``use_audio_in_video``), or a lone video or a lone audio clip. Every token belongs to a modality and to
a time window (the 2-second chunks in which the processor interleaves the two streams).

Score of a token (``normalize="lift"``, the default):

1. co-attention: inside its window, every token of the *other* modality attends to it with the
   softmax of cosine similarities of the projected (LLM-input) embeddings, ``cos / temperature``;
   the attention a token receives is summed over those queries (``prune.kernels.attention_stats``
   with one segment per window; same-modality keys are blocked by two extra coordinates, see
   :func:`co_attention`). A window where only one modality is present falls back to attention
   inside that modality.
2. lift: received attention divided by its uniform value, i.e. ``r_j * n / sum(r)`` over the tokens
   of the same modality in the same window, so a lift of 1 is "as much as an average token".
   This makes the two modalities comparable (their token counts differ by 10x) without removing
   what a joint pool is for: a modality whose attention concentrates on few tokens has lifts far
   above 1 and wins budget from a modality whose lifts are all near 1.
3. optionally the prompt: ``prompt_weight`` mixes in the lift of the attention the instruction
   tokens pay each token (per modality over the pool): ``score = (1 - w) log lift_co + w log lift_prompt``.

``normalize="rank"`` replaces each lift by its rank inside the modality, scaled to (0, 1]
(per-modality rank normalisation). Ranks are uniform in every modality, so the combined top-k then
keeps each modality in proportion to its size: the split no longer moves (it is close to
``budget="per_modality"``); it is offered for comparison.

Selection: ``budget="joint"`` keeps the top ``keep x pool`` tokens of the combined pool, after a
per-window floor: every (window, modality) group keeps at least ``min(window_floor, its size)``
tokens (its best ones); when the floors alone exceed the budget, groups are served round by round,
best first. ``budget="per_modality"`` keeps ``keep x`` each modality (with the same floor over the
windows of that modality): the fixed-budget baseline.

Images (and any single grid a view-based adapter hands over) are scored by the same lift of
attention within the image (one window, one modality).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels import attention_stats
from . import register
from .base import Method, Selection, View, stable_topk

MODALITIES = ("video", "audio")
_BLOCK_LOGIT = 1.0e4  # logit penalty on blocked (same-modality) pairs: exp(-1e4) is exactly 0 in fp32


@dataclass
class AVPool:
    """One joint pool of one prompt: the tokens a joint method budgets together.

    Attributes:
        features: (n, D) LLM-input embeddings of the pool's tokens, in prompt order.
        modality: (n,) long, index into ``MODALITIES`` (0 video, 1 audio).
        window: (n,) long, the time window of each token (0 = first 2 seconds of the pool).
        budget: tokens to keep in the whole pool (``keep`` x n, at least 1).
        modality_budgets: tokens to keep of each modality under ``budget="per_modality"``
            (``keep`` x that modality's tokens; 0 for an absent modality).
        prompt: (m, D) embeddings of the instruction tokens, or None.
    """

    features: torch.Tensor
    modality: torch.Tensor
    window: torch.Tensor
    budget: int
    modality_budgets: tuple[int, ...]
    prompt: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.modality.numel())


def _groups(*keys: torch.Tensor) -> torch.Tensor:
    """(n,) long id of each token's group (tokens with equal keys), ids dense from 0."""
    stacked = torch.stack([k.long() for k in keys], dim=1)
    return torch.unique(stacked, dim=0, return_inverse=True)[1]


def _normalize_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def co_attention(features: torch.Tensor, modality: torch.Tensor, window: torch.Tensor, temperature: float):
    """Attention each token receives from the other modality's tokens of its window.

    features (n, D); modality, window (n,) long. Returns (n,) fp32, each query's softmax summed over
    keys it reaches, divided by n (what ``attention_stats`` returns). Tokens are grouped by window
    (one ``attention_stats`` segment each); q = [x, onehot(m)], k = [x, -P t onehot(m)] with x the
    unit-norm features and t the temperature, so in a window holding both modalities a same-modality
    pair gets an extra logit of -P (P = 1e4: exactly zero weight in fp32) and a cross pair exactly 0.
    In a window with one modality the extra coordinates of k are 0: attention inside that modality.
    No (n, n) matrix is built: the statistic is ``attention_stats``' (O(n) memory, Triton on CUDA).
    """
    n = features.shape[0]
    device = features.device
    order = torch.sort(window, stable=True).indices  # windows contiguous, prompt order inside
    x = _normalize_rows(features)[order]
    onehot = torch.nn.functional.one_hot(modality[order].long(), len(MODALITIES)).float()
    # block only where the window holds both modalities: elsewhere the pairs stay exact (no -P
    # offset whose fp32 rounding would blur the logits)
    w_sorted = window[order].long() - int(window.min())
    n_windows = int(w_sorted.max()) + 1
    present = torch.zeros(n_windows, len(MODALITIES), dtype=torch.bool, device=device)
    present[w_sorted, modality[order].long()] = True
    mixed = present.all(1)[w_sorted].float()[:, None]
    q = torch.cat([x, onehot], dim=1)
    k = torch.cat([x, -_BLOCK_LOGIT * temperature * onehot * mixed], dim=1)
    counts = torch.bincount(w_sorted, minlength=n_windows).cpu()
    segments = torch.cat([torch.zeros(1, dtype=torch.long), counts[counts > 0].cumsum(0)])
    received = attention_stats(q[None, None], k[None, None], segments=segments, scale=1.0 / temperature)[0]
    out = torch.empty(n, dtype=torch.float32, device=device)
    out[order] = received
    return out


def prompt_attention(features: torch.Tensor, prompt: torch.Tensor, temperature: float) -> torch.Tensor:
    """(n,) fp32 attention the prompt's rows (m, D) pay each pool token (prompt keys blocked)."""
    n, m = features.shape[0], prompt.shape[0]
    x = _normalize_rows(torch.cat([features, prompt.to(features.device)], dim=0))
    is_prompt = torch.cat([torch.zeros(n), torch.ones(m)]).to(x)[:, None]
    q = torch.cat([x, is_prompt], dim=1)
    k = torch.cat([x, -_BLOCK_LOGIT * temperature * is_prompt], dim=1)
    rows = torch.arange(n, n + m, device=x.device)
    return attention_stats(q[None, None], k[None, None], query_index=rows, scale=1.0 / temperature)[0, :n]


def lift(received: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """received / its group's mean: (n,) fp32, mean 1 inside every group (0-sum groups give 1)."""
    n_groups = int(group.max()) + 1
    total = torch.zeros(n_groups, device=received.device).index_add_(0, group, received)
    count = torch.bincount(group, minlength=n_groups).float()
    mean = (total / count)[group]
    return torch.where(mean > 0, received / mean.clamp(min=1e-30), torch.ones_like(received))


def rank_normalize(values: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """Rank of each value inside its group scaled to (0, 1] (ties: the earlier token ranks lower)."""
    out = torch.empty_like(values, dtype=torch.float32)
    for g in torch.unique(group).tolist():
        idx = torch.nonzero(group == g, as_tuple=True)[0]
        ranks = torch.empty(idx.numel(), dtype=torch.float32, device=values.device)
        ranks[torch.sort(values[idx], stable=True).indices] = torch.arange(
            1, idx.numel() + 1, dtype=torch.float32, device=values.device
        )
        out[idx] = ranks / idx.numel()
    return out


def floor_then_top(score: torch.Tensor, group: torch.Tensor, budget: int, floor: int,
                   allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Indices (ascending) of ``budget`` tokens: first every group's best ``floor`` tokens, then the
    best of the rest. When the floors alone exceed the budget, round r (every group's r-th best
    token) is served before round r + 1, best score first inside a round. Ties go to the lower index.
    """
    n = score.numel()
    device = score.device
    allowed = torch.ones(n, dtype=torch.bool, device=device) if allowed is None else allowed
    budget = min(int(budget), int(allowed.sum()))
    picked = torch.zeros(n, dtype=torch.bool, device=device)
    if budget <= 0:
        return torch.zeros(0, dtype=torch.long, device=device)
    if floor > 0:
        cand, rounds = [], []
        for g in torch.unique(group[allowed]).tolist():
            best = stable_topk(score, floor, allowed & (group == g))
            cand.append(best)
            rounds.append(torch.arange(best.numel(), device=device))
        cand, rounds = torch.cat(cand), torch.cat(rounds)
        if cand.numel() > budget:  # serve round 0 of every group, then round 1, ...
            by_index = torch.sort(cand).indices
            cand, rounds = cand[by_index], rounds[by_index]
            order = torch.sort(score[cand].float(), descending=True, stable=True).indices
            order = order[torch.sort(rounds[order], stable=True).indices]
            cand = cand[order[:budget]]
        picked[cand] = True
    rest = stable_topk(score, budget - int(picked.sum()), allowed & ~picked)
    picked[rest] = True
    return torch.nonzero(picked, as_tuple=True)[0]


@register("avpool")
class AVPoolPrune(Method):
    description = "joint audio-visual pool: cross-modal co-attention, one budget over audio + video (Omni)"
    defaults = {
        "budget": "joint",  # "joint": top-(keep x pool) over both modalities; "per_modality": keep x each
        "window_floor": 1,  # every (window, modality) keeps at least this many tokens
        "temperature": 0.1,  # softmax temperature on cosine similarity of the embeddings
        "prompt_weight": 0.0,  # weight of the instruction's attention in the score (0 = co-attention only)
        "normalize": "lift",  # "lift" (budget moves between modalities) | "rank" (per-modality ranks)
    }
    option_ranges = {"window_floor": (0, None), "temperature": (1e-6, None), "prompt_weight": (0.0, 1.0)}
    option_choices = {"budget": ("joint", "per_modality"), "normalize": ("lift", "rank")}
    needs_features = True
    joint = True  # adapters that know audio/video pools call select_pool

    def __init__(self, **options):
        super().__init__(**options)
        o = self.options
        if o["budget"] not in ("joint", "per_modality"):
            raise ValueError(f"avpool budget must be 'joint' or 'per_modality', got {o['budget']!r}")
        if o["normalize"] not in ("lift", "rank"):
            raise ValueError(f"avpool normalize must be 'lift' or 'rank', got {o['normalize']!r}")
        floor = o["window_floor"]
        if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
            raise ValueError(f"avpool window_floor must be an int >= 0, got {floor!r}")
        if not isinstance(o["temperature"], (int, float)) or not o["temperature"] > 0:
            raise ValueError(f"avpool temperature must be > 0, got {o['temperature']!r}")
        if not isinstance(o["prompt_weight"], (int, float)) or not 0.0 <= o["prompt_weight"] <= 1.0:
            raise ValueError(f"avpool prompt_weight must be in [0, 1], got {o['prompt_weight']!r}")

    # ---- scores --------------------------------------------------------------------------------
    def _normalized(self, value: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        if self.options["normalize"] == "rank":
            return rank_normalize(value, modality)
        return torch.log(value.clamp(min=1e-12))

    def pool_scores(self, pool: AVPool) -> torch.Tensor:
        """(n,) fp32 score of every token of the pool (see the module docstring)."""
        temperature = float(self.options["temperature"])
        weight = float(self.options["prompt_weight"])
        modality = pool.modality.to(pool.features.device).long()
        window = pool.window.to(pool.features.device).long()
        co = lift(co_attention(pool.features, modality, window, temperature), _groups(window, modality))
        score = self._normalized(co, modality)
        if weight > 0 and pool.prompt is not None and pool.prompt.shape[0] > 0:
            prompt = lift(prompt_attention(pool.features, pool.prompt, temperature), modality)
            score = (1.0 - weight) * score + weight * self._normalized(prompt, modality)
        return score

    # ---- selection -----------------------------------------------------------------------------
    def select_pool(self, pool: AVPool) -> Selection:
        """Keep-set of one joint pool: ascending indices into the pool's tokens, and the scores."""
        score = self.pool_scores(pool)
        floor = int(self.options["window_floor"])
        modality = pool.modality.to(score.device).long()
        window = pool.window.to(score.device).long()
        if self.options["budget"] == "joint":
            keep = floor_then_top(score, _groups(window, modality), pool.budget, floor)
        else:
            keep = torch.cat([
                floor_then_top(score, window, budget, floor, allowed=modality == m)
                for m, budget in enumerate(pool.modality_budgets)
            ]).sort().values
        return Selection(keep=keep, score=score)

    def select(self, view: View) -> Selection:
        """One image (a single grid): lift of attention within the image's valid tokens."""
        if view.features is None:
            raise RuntimeError("avpool needs the view's embeddings (needs_features)")
        device = view.features.device  # the embeddings' device (the valid mask may sit on the host)
        valid = view.valid.to(device)
        idx = torch.nonzero(valid, as_tuple=True)[0]
        n = view.num_patches
        zeros = torch.zeros(idx.numel(), dtype=torch.long, device=device)
        pool = AVPool(features=view.features[idx], modality=zeros, window=zeros, budget=view.budget,
                      modality_budgets=(view.budget,))
        score = torch.full((n,), float("nan"), device=device)
        score[idx] = self.pool_scores(pool)
        keep = idx[floor_then_top(score[idx], zeros, view.budget, 0)]
        return Selection(keep=keep.sort().values, score=score)


__all__ = [
    "MODALITIES",
    "AVPool",
    "AVPoolPrune",
    "co_attention",
    "floor_then_top",
    "lift",
    "prompt_attention",
    "rank_normalize",
]
