"""Pruning statistics of an evaluation: what the language model saw and how long prefills took,
counted through hooks on the Hugging Face model and summed over data-parallel processes."""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from prune._compat import past_length
from prune.config import PruneConfig


@dataclass
class Totals:
    prefills: int = 0
    prompts: int = 0
    tokens_before: int = 0
    tokens_after: int = 0
    prefill_ms: float = 0.0

    def add(self, other: Totals) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def gather_totals(totals: Totals) -> Totals:
    """``totals`` summed over the processes of the default torch.distributed group (every process
    must call this; lmms-eval calls ``clean()`` on all of them). Without a group: ``totals``."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return totals
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, totals)
    total = Totals()
    for part in parts:
        total.add(part)
    return total


class PruneStats:
    """Counts what the language model saw and times prefills, through hooks on the HF model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.totals = Totals()
        self._generate_t0: float | None = None
        self._t0: float | None = None
        config = model.config
        self._placeholder_ids = [
            int(v)
            for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
            if isinstance(v := getattr(config, name, None), int)
        ]
        self._handles = [
            model.register_forward_pre_hook(self._before, with_kwargs=True),
            model.register_forward_hook(self._after, with_kwargs=True),
        ]
        original = model.generate

        @functools.wraps(original)
        def generate(*args, **kwargs):
            self._sync()
            self._generate_t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self._generate_t0 = None

        model.generate = generate
        self._generate = generate

    def _sync(self) -> None:
        param = next(self.model.parameters(), None)
        if param is not None and param.device.type == "cuda":
            torch.cuda.synchronize(param.device)

    def _before(self, module, args, kwargs) -> None:
        if args:
            params = list(inspect.signature(module.forward).parameters)
            kwargs = {**dict(zip(params, args)), **kwargs}
        if past_length(kwargs) > 0:
            return
        self._sync()
        self._t0 = self._generate_t0 if self._generate_t0 is not None else time.perf_counter()
        self._ids = kwargs.get("input_ids")

    def _after(self, module, args, kwargs, output) -> None:
        if self._t0 is None:
            return
        self._sync()
        elapsed = (time.perf_counter() - self._t0) * 1e3
        self._t0, self._generate_t0 = None, None  # later steps of this generate are decoding
        state = getattr(module, "prune_state", None)
        if state is not None and state.last is not None:
            images = state.last.images
            if not images:
                return
            prompts = len({im.sample for im in images})
            before, after = state.last.vision_tokens_before, state.last.vision_tokens_after
        else:
            ids = self._ids
            if ids is None or not self._placeholder_ids:
                return
            per_row = torch.isin(ids, torch.tensor(self._placeholder_ids, device=ids.device)).sum(-1)
            prompts = int((per_row > 0).sum())
            if prompts == 0:
                return
            before = after = int(per_row.sum())
        t = self.totals
        t.prefills += 1
        t.prompts += prompts
        t.tokens_before += before
        t.tokens_after += after
        t.prefill_ms += elapsed

    def gathered(self) -> Totals:
        """Totals summed over all processes (a collective call when torch.distributed is up)."""
        return gather_totals(self.totals)

    def reset(self) -> None:
        self.totals = Totals()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self.model.__dict__.get("generate") is self._generate:
            del self.model.generate


def summarize(totals: Totals, config: PruneConfig | None) -> dict[str, Any]:
    """Per-prompt means, as lmms-eval's results get them (numbers only)."""
    if totals.prompts == 0:
        return {}
    out: dict[str, Any] = {
        "prune_prompts": totals.prompts,
        "prune_vision_tokens_before": totals.tokens_before / totals.prompts,
        "prune_vision_tokens_after": totals.tokens_after / totals.prompts,
        "prune_keep_ratio": totals.tokens_after / max(totals.tokens_before, 1),
        "prune_prefill_ms": totals.prefill_ms / max(totals.prefills, 1),
    }
    if config is not None and isinstance(config.keep, (int, float)):
        out["prune_keep"] = config.keep
    return out
