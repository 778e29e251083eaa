"""What every pruning method sees and returns.

A method's readable reference works on one *view* at a time (``select``): one grid of vision tokens
(an image, an anyres crop, a video frame). The path prune runs is ``select_batch``: every view of one
encoder call at once, on the model's device, with no host synchronisation (budgets are host
arithmetic on shapes; scores stay on the device). It knows nothing about models; adapters in
``prune.hooks`` build the views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch


@dataclass(frozen=True)
class EncoderInfo:
    """What a method may ask about the vision encoder of the wrapped model."""

    num_layers: int
    feature_layer: int  # index of the encoder layer whose output the LLM reads (0-based, positive)
    has_cls: bool  # the encoder prepends a [CLS] token (column 0 of its attention)
    family: str  # adapter family name, e.g. "llava"


@dataclass(frozen=True)
class SignalRequest:
    """An attention statistic of one encoder layer.

    ``query="all"``: attention each key receives, mean over heads and all query rows.
    ``query="sum"``: the same, summed (not averaged) over the query rows of each attention call
    (HiPrune's Qwen reference works on that scale).
    ``query="cls"``: attention the [CLS] row pays each key, mean over heads.
    """

    layer: int
    query: str = "all"

    @property
    def key(self) -> str:
        return f"{self.query}@{self.layer}"


@dataclass
class View:
    """One grid of vision tokens to select from.

    Attributes:
        grid: (h, w) patches; patch p sits at row p // w, column p % w.
        budget: number of tokens to keep (already capped at the number of valid patches).
        valid: (h*w,) bool; False where the model's layout dropped the patch (anyres unpadding).
        signals: SignalRequest.key -> (h*w,) fp32 score per patch (the [CLS] column removed).
        features: (h*w, D) LLM-input embeddings of the patches (rows of invalid patches are zero).
        index: the view's number inside its image (0 = base image), used to seed random choices.
    """

    grid: tuple[int, int]
    budget: int
    valid: torch.Tensor
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    features: torch.Tensor | None = None
    index: int = 0

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass
class Selection:
    """A method's answer for one view.

    keep: (T,) ascending patch indices that the LLM will see.
    assign: optional (h*w,) long; for merging methods, the kept patch each patch is averaged into
        (-1: dropped). The kept token's embedding becomes the mean of the patches assigned to it.
    score: optional (h*w,) fp32, the score the method ranked by (recorded for users and plots).
    """

    keep: torch.Tensor
    assign: torch.Tensor | None = None
    score: torch.Tensor | None = None


@dataclass
class ViewBatch:
    """Every view of one encoder call that needs ranking, stacked (ragged grids padded to the largest).

    Attributes:
        grids: (h, w) of each view (host).
        budgets: tokens each view keeps (host; each below the view's valid count).
        valid: (V, P) bool on the device; False at invalid patches and at padding columns p >= h*w.
        valid_host: the same mask on the host (it comes from shapes: no device read).
        signals: SignalRequest.key -> (V, P) fp32 on the device, -inf at padding columns.
        index: each view's number inside its image (seeds random choices).
        features: (V, P, D) LLM-input embeddings of the patches on the device (zeros where no token
            sits), for methods with ``needs_features``; else None.
    """

    grids: list[tuple[int, int]]
    budgets: list[int]
    valid: torch.Tensor
    valid_host: torch.Tensor
    signals: dict[str, torch.Tensor] = field(default_factory=dict)
    index: list[int] = field(default_factory=list)
    features: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return self.valid.device

    def __len__(self) -> int:
        return len(self.grids)

    def view(self, v: int) -> View:
        """View ``v`` as the per-view reference ``Method.select`` takes it (unpadded)."""
        h, w = self.grids[v]
        n = h * w
        return View(grid=(h, w), budget=self.budgets[v], valid=self.valid[v, :n],
                    signals={key: s[v, :n] for key, s in self.signals.items()}, index=self.index[v],
                    features=None if self.features is None else self.features[v, :n])

    def host_view(self, v: int) -> View:
        """View ``v`` with host tensors only (for methods that need no signals)."""
        h, w = self.grids[v]
        return View(grid=(h, w), budget=self.budgets[v], valid=self.valid_host[v, : h * w], index=self.index[v])

    def column(self, values: list[int]) -> torch.Tensor:
        """(V, 1) long on the device from host ints (a pinned, non-blocking copy)."""
        return to_device(torch.tensor(values, dtype=torch.long)[:, None], self.device)


@dataclass
class BatchSelection:
    """A method's answer for a :class:`ViewBatch`.

    keep: (V, P) bool on the device, the kept patches of each view.
    counts: kept patches of each view as the host knows them from budgets (None: data-dependent,
        e.g. an opt-in reference quirk; the caller then reads the count back, one sync).
    assign: optional (V, P) long, as :attr:`Selection.assign` per view (-1: dropped or padding).
    score: optional (V, P) fp32, the score the method ranked by.
    """

    keep: torch.Tensor
    counts: list[int] | None
    assign: torch.Tensor | None = None
    score: torch.Tensor | None = None


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a synchronisation: copied from pinned memory, non-blocking
    (the pinned block is not reused before the copy ends: the caching host allocator records it)."""
    if device.type == "cpu":
        return host
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def _pad_rows(rows: list[torch.Tensor], width: int, fill: float) -> torch.Tensor:
    """(len(rows), width): each 1-D row padded on the right with ``fill``."""
    if all(r.numel() == width for r in rows):
        return torch.stack(rows)
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.numel()), value=fill) for r in rows])


class Method:
    """Base class of a pruning method; subclasses register with ``@register("name")``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: option name -> default. Every option must be listed here; unknown options are refused.
    defaults: ClassVar[dict[str, Any]] = {}
    needs_cls: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False
    #: ``select`` depends on the view's shape, validity and the options only (no signal, no feature):
    #: the default ``select_batch`` runs it on the host and copies the answer once
    host_select: ClassVar[bool] = False

    #: option name -> (low, high) inclusive bounds of a numeric option (None: unbounded on that side)
    option_ranges: ClassVar[dict[str, tuple[float | None, float | None]]] = {}
    #: option name -> the values a string option may take
    option_choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: option name -> type, for options whose default (None) does not say it
    option_types: ClassVar[dict[str, type]] = {}
    #: option name -> one line that ``prune methods`` prints beside it
    option_notes: ClassVar[dict[str, str]] = {}

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "none"
            raise TypeError(
                f"method {self.name!r} got unknown option(s) {unknown}; its options are: {allowed}"
            )
        for name, value in options.items():
            self._check_option(name, value)
        self.options = {**self.defaults, **options}

    def _check_option(self, name: str, value: Any) -> None:
        """Type and range of one option, raising with the option named. The type is ``option_types``'
        entry or the default's type (a None default with no entry: any type, checked where it is used);
        then ``option_ranges`` and ``option_choices``."""
        default = self.defaults[name]
        where = f"{self.name} option {name}={value!r}"
        if value is None:
            if default is not None:
                raise TypeError(f"{where}: expected {type(default).__name__}, not None")
            return
        kind = self.option_types.get(name, type(default) if default is not None else None)
        if kind is bool:
            if not isinstance(value, bool):
                raise TypeError(f"{where}: expected True or False")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{where}: expected an int")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TypeError(f"{where}: expected a number")
            if not math.isfinite(value):
                raise ValueError(f"{where}: must be finite")
        elif kind is str and not isinstance(value, str):
            raise TypeError(f"{where}: expected a string")
        elif kind in (tuple, list) and not isinstance(value, tuple | list):
            raise TypeError(f"{where}: expected a list or tuple")
        if name in self.option_ranges:
            low, high = self.option_ranges[name]
            if (low is not None and value < low) or (high is not None and value > high):
                span = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
                raise ValueError(f"{where}: must be in {span}")
        if name in self.option_choices and value not in self.option_choices[name]:
            raise ValueError(f"{where}: must be one of {self.option_choices[name]}")

    def check_encoder(self, encoder: EncoderInfo) -> None:
        """Raise ValueError when the method cannot run on this encoder."""
        if self.needs_cls and not encoder.has_cls:
            raise ValueError(
                f"method {self.name!r} needs a [CLS] token, but the {encoder.family} vision encoder has none; "
                "use method='hiprune' (no CLS needed) instead"
            )

    def signals(self, encoder: EncoderInfo) -> list[SignalRequest]:
        """The encoder statistics this method needs (collected during the vision forward)."""
        return []

    def bind(self, encoder: EncoderInfo) -> list[SignalRequest]:
        """Check the encoder and fix the signal requests; called once by ``prune.wrap``."""
        self.check_encoder(encoder)
        self.encoder = encoder
        self.requests = self.signals(encoder)
        return self.requests

    def select(self, view: View) -> Selection:
        """The readable per-view reference (the batched path is tested against it)."""
        raise NotImplementedError

    def select_batch(self, batch: ViewBatch) -> BatchSelection:
        """Every view of one call at once; the same token sets as :meth:`select` view by view.

        Default: :meth:`select` per view. A ``host_select`` method is run on host views (its choice
        depends on shapes and options only) and its answer copied to the device once, non-blocking;
        any other runs on the device views and its kept counts are read back (syncs: methods on the
        fast path override this)."""
        on_host = self.host_select
        width = batch.valid.shape[1]
        keep = torch.zeros(len(batch), width, dtype=torch.bool)
        assign = score = None
        sels = [self.select(batch.host_view(v) if on_host else batch.view(v)) for v in range(len(batch))]
        if not on_host:
            keep = keep.to(batch.device)
        for v, sel in enumerate(sels):
            keep[v, sel.keep.to(keep.device)] = True
        if any(sel.assign is not None for sel in sels):
            assign = _pad_rows([sel.assign.to(keep.device) for sel in sels], width, -1)
        if any(sel.score is not None for sel in sels):
            score = _pad_rows([sel.score.to(keep.device).float() for sel in sels], width, float("nan"))
        counts = [int(sel.keep.numel()) for sel in sels]
        if on_host:
            keep = to_device(keep, batch.device)
            assign = None if assign is None else to_device(assign, batch.device)
            score = None if score is None else to_device(score, batch.device)
        return BatchSelection(keep=keep, counts=counts, assign=assign, score=score)

    def view_budgets(self, total: int, caps: list[int], patches: list[int], budget_of, proportional: bool = False
                     ) -> list[int]:
        """Tokens each view of one image keeps. ``total``: the image's budget; ``caps``: prunable
        tokens of each view; ``patches``: each view's full grid size; ``budget_of(n)``: the budget
        ``keep`` gives n tokens. Default: ``total`` split evenly (or proportionally), what a view
        cannot take going to the others; the option ``views`` (hiprune, cls) picks the references'
        LLaVA-NeXT budgeting instead."""
        from ..hooks.base import split_budget

        mode = self.options.get("views", "even")
        if mode == "floor":  # HiPrune / FasterVLM forks: int(T / views) each, the remainder is lost
            return [min(cap, total // len(caps)) for cap in caps]
        if mode == "per_view":  # FasterVLM's fork: every view keeps T of its full grid
            return [min(cap, budget_of(p)) for cap, p in zip(caps, patches)]
        return split_budget(total, caps, proportional=proportional)


SCORE_DTYPES = {None: None, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_option(method: str, name: str, value: Any, *, kind: type | tuple[type, ...] | None = None,
                 choices: tuple | None = None, low: float | None = None, high: float | None = None,
                 optional: bool = False) -> Any:
    """Validate one method option at wrap time; raises TypeError / ValueError naming it."""
    if optional and value is None:
        return value
    if choices is not None:
        if value not in choices:
            raise ValueError(f"{method} option {name}={value!r} must be one of {list(choices)}")
        return value
    if kind is not None and (isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
                             or not isinstance(value, kind)):
        names = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TypeError(f"{method} option {name} must be {names}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{method} option {name}={value!r} must be in [{low}, {high}]")
    return value


def cast_scores(scores: torch.Tensor, dtype: str | None) -> torch.Tensor:
    """``scores`` rounded to ``dtype`` ("float16" / "bfloat16", as the references rank) and back to
    fp32; None leaves them in fp32. Values that round to the same number tie, and ties go to the
    lower index (the references' CUDA top-k breaks them its own way)."""
    if dtype is None:
        return scores.float()
    return scores.to(SCORE_DTYPES[dtype]).float()


def stable_topk(scores: torch.Tensor, k: int, allowed: torch.Tensor | None = None) -> torch.Tensor:
    """Ascending indices of the k largest scores (ties: the lower index wins), through the
    ``prune.kernels.topk_gather`` dispatcher. Positions where ``allowed`` is False are never chosen
    (k is capped at their count)."""
    from ..kernels import topk_gather

    scores = scores.float()
    if allowed is not None:
        k = min(k, int(allowed.sum()))
        scores = scores.masked_fill(~allowed, float("-inf"))
    k = max(0, min(k, scores.numel()))
    if k == 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    _, indices = topk_gather(scores.new_zeros(1, scores.numel(), 1), scores[None], k)
    return indices[0]


def _tie_keys(scores: torch.Tensor) -> torch.Tensor:
    """(..., N) int64 keys, all distinct, whose descending order is the stable descending order of
    ``scores`` (ties: the lower index first; NaN above +inf; -0.0 == +0.0), as in
    ``prune.kernels.topk_gather``: the order-preserving int32 image of the fp32 score, times 2**32,
    plus (N - 1 - index)."""
    n = scores.shape[-1]
    s = scores.float() + 0.0  # -0.0 -> +0.0
    bits = s.view(torch.int32)
    key = torch.where(bits < 0, bits ^ (2**31 - 1), bits)
    key = torch.where(torch.isnan(s), torch.full_like(key, 2**31 - 1), key)
    tie = (n - 1) - torch.arange(n, device=scores.device, dtype=torch.int64)
    return key.to(torch.int64) * (1 << 32) + tie


def stable_topk_rows(
    scores: torch.Tensor, k: list[int] | torch.Tensor, allowed: torch.Tensor | None = None, kmax: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise :func:`stable_topk` of a (V, P) score matrix in one top-k, with no host sync.

    ``k``: per row, a host list, or a (V,) / (V, 1) long tensor on the device (then ``kmax``, a host
    bound on it, is required). Positions where ``allowed`` is False are never chosen (k is capped at
    their count). Returns ``(index, take)``: (V, K) indices in rank order and a (V, K) bool, True for
    the first k[v] of row v (K = the largest k, at most P)."""
    v, p = scores.shape
    s = scores.float()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    if isinstance(k, list):
        kmax = max(k, default=0)
    kmax = max(0, min(int(kmax), p))
    index = _tie_keys(s).topk(kmax, dim=1, sorted=True).indices  # (V, K) rank order
    rank = torch.arange(kmax, device=s.device)[None, :]
    if isinstance(k, list):
        kk = k[0] if len(set(k)) == 1 else to_device(torch.tensor(k or [0], dtype=torch.long), s.device)[:v, None]
    else:
        kk = k.to(s.device).view(v, 1)
    if allowed is not None:
        cap = allowed.sum(1, keepdim=True)
        kk = cap.clamp(max=kk) if isinstance(kk, int) else torch.minimum(kk, cap)
    take = (rank < kk).expand(v, kmax)
    return index, take


def stable_topk_mask(
    scores: torch.Tensor, k: list[int] | torch.Tensor, allowed: torch.Tensor | None = None, kmax: int | None = None
) -> torch.Tensor:
    """(V, P) bool: row v marks the :func:`stable_topk` set of ``scores[v]`` (see :func:`stable_topk_rows`)."""
    index, take = stable_topk_rows(scores, k, allowed, kmax)
    return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(1, index, take)


def layer_index(layer: int, num_layers: int, name: str) -> int:
    """Resolve a possibly negative layer index and check its range."""
    resolved = layer + num_layers if layer < 0 else layer
    if not 0 <= resolved < num_layers:
        raise ValueError(f"{name}={layer} is outside the encoder's {num_layers} layers")
    return resolved
