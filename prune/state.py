"""The per-model state that hooks share: nothing here is global."""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import PruneConfig


@dataclass
class ImageRecord:
    """What happened to one image (or video) of one prompt.

    sample: batch row; positions: (n,) sequence positions of its placeholder tokens (original prefill);
    kept: (n,) bool; scores: name -> (n,) fp32 score per token (NaN where a token was never a candidate,
    e.g. LLaVA-NeXT's image_newline); budget: tokens the method was asked to keep (newlines excluded);
    grids: (h, w) patches of each view (base image, crops); merged: the LLM-input rows of the kept
    tokens when the method merges tokens (pool), in token order. Read-only: the records of later calls
    of the same shapes share tensors (positions, token views and patches, the all-kept mask of a call
    that ranked nothing) with the selection plan the wrapped model keeps for those shapes.
    """

    sample: int
    positions: torch.Tensor
    kept: torch.Tensor
    scores: dict[str, torch.Tensor]
    budget: int
    grids: list[tuple[int, int]]
    modality: str = "image"
    merged: torch.Tensor | None = None
    #: (n,) the view (index into ``grids``) and the patch inside it of each token; -1 for tokens that
    #: are never candidates (newlines). None where the adapter does not map tokens to views.
    token_view: torch.Tensor | None = None
    token_patch: torch.Tensor | None = None
    #: tokens each view was asked to keep (sums to ``budget`` unless a method's option budgets views
    #: otherwise: ``views="floor"`` loses the remainder, ``views="per_view"`` gives every view T)
    view_budgets: list[int] | None = None
    #: tokens kept, as the host knows it from budgets (no device read); None where the method's count
    #: depends on the data (an opt-in reference quirk) and is read from ``kept``
    kept_count: int | None = None

    def view_masks(self) -> list[torch.Tensor]:
        """Per view, a (h*w,) bool of the kept patches (False where the layout dropped a patch)."""
        if self.token_view is None:
            raise ValueError("this record does not map tokens to views")
        out = []
        for v, (h, w) in enumerate(self.grids):
            mask = torch.zeros(h * w, dtype=torch.bool)
            here = self.token_view.cpu() == v
            mask[self.token_patch.cpu()[here]] = self.kept.cpu()[here]
            out.append(mask)
        return out  # (kept, D) rows a merging method produced (e.g. pool), else None

    @property
    def tokens_before(self) -> int:
        return int(self.positions.numel())

    @property
    def tokens_after(self) -> int:
        return self.kept_count if self.kept_count is not None else int(self.kept.sum())

    @property
    def selected(self) -> int:
        """Prunable tokens kept (``tokens_after`` without the never-pruned newline tokens)."""
        kept = self.kept.cpu()
        if self.token_view is not None:
            kept = kept & (self.token_view.cpu() >= 0)
        return int(kept.sum())

    @property
    def shortfall(self) -> int:
        """``budget - selected``: 0 when the method kept exactly its budget; > 0 where an opt-in
        reference quirk keeps fewer (hiprune ``exclusion="reference"``, ``views="floor"``); < 0 where
        ``views="per_view"`` keeps T per view."""
        return self.budget - self.selected


@dataclass
class PruneRecord:
    """The last prefill: ``keep_mask`` is (batch, original prefill length) bool, True where the
    language model saw that position (text, padding and kept vision tokens)."""

    keep_mask: torch.Tensor
    images: list[ImageRecord]
    positions: str
    position_ids: torch.Tensor | None = None  # what the language model got for the kept rows
    padding: torch.Tensor | None = None  # (batch, prefill length) bool, True at padding positions
    #: in-LLM methods: (first decoder layer, (batch, prefill length) bool of what it and the layers up
    #: to the next entry saw); layer 0 sees everything
    layer_masks: list[tuple[int, torch.Tensor]] | None = None

    def seen_by(self, layer: int) -> torch.Tensor:
        """(batch, prefill length) bool: the positions decoder layer ``layer`` saw."""
        if not self.layer_masks:
            return self.keep_mask
        current = self.layer_masks[0][1]
        for first, mask in self.layer_masks:
            if first <= layer:
                current = mask
        return current

    @property
    def vision_tokens_before(self) -> int:
        return sum(im.tokens_before for im in self.images)

    @property
    def vision_tokens_after(self) -> int:
        return sum(im.tokens_after for im in self.images)


@dataclass
class Plan:
    """How later calls map onto the shorter cache that a pruned prefill left behind."""

    prefill_len: int  # logical (unpruned) prefill length
    kept_len: int  # rows the language model actually cached
    prefix_mask: torch.Tensor  # (B, kept_len) attention mask of the cached prefix
    shift: torch.Tensor  # (B,) subtracted from logical positions ("compact"); zeros for "original"
    decode_mask: torch.Tensor | None = None  # static cache: its (B, capacity) physical padding mask


class _CallLocal(threading.local):
    """What one call (one thread) is in the middle of; every thread starts with empty scratch."""

    def __init__(self) -> None:
        self.call: dict[str, Any] = {}  # the multimodal forward's input_ids / inputs_embeds
        self.collecting: dict[str, list] | None = None  # statistics of the encoder run in progress
        self.media: dict[str, Any] = {}  # modality -> (feature-function arguments, statistics)
        self.encoded: dict[str, Any] = {}  # modality -> (output, media) of the last encoder run
        self.plan: Plan | None = None  # the decode plan of a cache-less call (use_cache=False)
        self.context: Any = None  # the in-LLM cut's context of this call
        self.last: PruneRecord | None = None
        self.scratch: dict[str, Any] = {}  # adapter-specific per-call values


@dataclass
class PruneState:
    """Owned by a wrapped model as ``model.prune_state``: the configuration, plus per-call scratch
    that belongs to the calling thread (one wrapped model serves several threads as the unwrapped
    model does) and the decode plans of the caches its prefills produced (a plan travels with its
    cache: a later ``generate(past_key_values=...)`` finds it, another call's cache does not)."""

    config: PruneConfig
    family: str
    positions: str
    #: the vision encoder's attention while wrapped: "segmented" (one call per layer) or "default"
    vision_attention: str = "default"
    #: the CUDA graphs of the vision layers (``vision_graphs=True``; ``.stats()``), else None
    vision_graphs: Any = field(default=None, repr=False)
    #: the compiled vision layers (``vision_compile=True``; ``.stats()``), else None
    vision_compile: Any = field(default=None, repr=False)
    _removers: list = field(default_factory=list, repr=False)
    _latest: PruneRecord | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._fresh()

    def _fresh(self) -> None:
        self._local = _CallLocal()
        self._plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> Plan
        self._contexts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # cache -> in-LLM Context
        self._selection_plans: dict = {}  # call structure -> the selection's host plan (hooks/base.py)

    # copies and pickles carry the configuration and the last record, not calls in flight
    def __getstate__(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for name in ("_local", "_plans", "_contexts", "_selection_plans"):
            out.pop(name, None)
        return out

    def __setstate__(self, values: dict[str, Any]) -> None:
        self.__dict__.update(values)
        self._fresh()

    @property
    def last(self) -> PruneRecord | None:
        """The record of this thread's last prefill (of any thread's, if this one made none)."""
        mine = self._local.last
        return mine if mine is not None else self._latest

    @last.setter
    def last(self, record: PruneRecord | None) -> None:
        self._local.last = record
        self._latest = record

    # per-call scratch (see _CallLocal)
    def _get(name):  # noqa: N805 - a property factory
        return property(lambda self: getattr(self._local, name), lambda self, v: setattr(self._local, name, v))

    _call = _get("call")
    _collecting = _get("collecting")
    _media = _get("media")
    _encoded = _get("encoded")
    _context = _get("context")
    _scratch = _get("scratch")
    del _get

    def plan_for(self, cache: Any) -> Plan | None:
        """The decode plan of a cache a pruned prefill produced (None if it was not pruned)."""
        if cache is None:
            return self._local.plan
        try:
            return self._plans.get(cache)
        except TypeError:  # a legacy tuple cache cannot be weakly referenced
            return self._local.plan

    def set_plan(self, cache: Any, plan: Plan | None) -> None:
        self._local.plan = plan
        if cache is None:
            return
        try:
            if plan is None:
                self._plans.pop(cache, None)
            else:
                self._plans[cache] = plan
        except TypeError:
            pass
