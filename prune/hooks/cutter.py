"""Drop rows before the language model and map every later step onto the shorter cache.

Shared by all adapters: the prefill cut gathers ``inputs_embeds``, ``attention_mask`` and
``position_ids`` (1-D or multi-axis such as M-RoPE's (3, B, L)) with the keep-mask and re-pads
ragged rows on the left; decode steps get the kept prefix of the mask and positions that continue
from the right logical value.
"""

from __future__ import annotations

from typing import Any

import torch

from ..state import Plan


def _logical_positions(position_ids: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """Positions the unwrapped model would use: (..., B, L)."""
    if position_ids is None:
        return torch.arange(length, device=device).expand(batch, length)
    if position_ids.shape[-2] == 1 and batch > 1:
        position_ids = position_ids.expand(*position_ids.shape[:-2], batch, length)
    return position_ids


def cut_prefill(
    kwargs: dict[str, Any], keep_mask: torch.Tensor, mode: str
) -> tuple[dict[str, Any], Plan, torch.Tensor]:
    """Return new language-model kwargs holding only the kept rows, the decode plan, and the
    position ids given to the kept rows.

    keep_mask: (B, L) bool over the prefill. ``mode`` is "original" or "compact".
    """
    embeds = kwargs["inputs_embeds"]  # (B, L, D)
    batch, length, _ = embeds.shape
    device = embeds.device
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    elif mask.ndim != 2:
        raise ValueError(
            "prune needs a 2-D attention mask (batch, length); got one with shape " + str(tuple(mask.shape))
        )
    logical = _logical_positions(kwargs.get("position_ids"), batch, length, device)
    keep_mask = keep_mask.to(device)

    counts = keep_mask.sum(1)  # (B,)
    kept_len = int(counts.max())
    # Left re-padding: row b's kept tokens end at the last column.
    dest = (kept_len - counts)[:, None] + keep_mask.long().cumsum(1) - 1  # (B, L)
    rows, cols = keep_mask.nonzero(as_tuple=True)
    to = dest[rows, cols]

    new_embeds = embeds.new_zeros(batch, kept_len, embeds.shape[-1])
    new_embeds[rows, to] = embeds[rows, cols]
    new_mask = mask.new_zeros(batch, kept_len)
    new_mask[rows, to] = mask[rows, cols]

    removed = (~keep_mask).long()
    if mode == "compact":
        logical = logical - (removed.cumsum(1) - removed)  # minus the tokens removed before each one
        shift = removed.sum(1)
    else:
        shift = torch.zeros(batch, dtype=torch.long, device=device)
    new_positions = logical.new_zeros(*logical.shape[:-2], batch, kept_len)
    new_positions[..., rows, to] = logical[..., rows, cols]

    out = dict(kwargs)
    out["inputs_embeds"] = new_embeds
    out["attention_mask"] = new_mask
    out["position_ids"] = new_positions
    if "cache_position" in out and out["cache_position"] is not None:  # transformers < 5.x kept it
        out["cache_position"] = torch.arange(kept_len, device=device)
    plan = Plan(prefill_len=length, kept_len=kept_len, prefix_mask=new_mask, shift=shift)
    return out, plan, new_positions


def map_decode(kwargs: dict[str, Any], plan: Plan, past_len: int) -> dict[str, Any]:
    """Language-model kwargs of a call after a pruned prefill, mapped onto the shorter cache.

    ``past_len`` is the cache's real length; the caller's mask and positions are logical.
    """
    embeds = kwargs["inputs_embeds"]
    batch, q_len = embeds.shape[:2]
    device = embeds.device
    past_logical = plan.prefill_len + (past_len - plan.kept_len)
    mask = kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, past_logical + q_len, dtype=plan.prefix_mask.dtype, device=device)
    if mask.ndim != 2 or mask.shape[1] != past_logical + q_len:
        raise ValueError(
            f"after a pruned prefill of {plan.prefill_len} tokens the attention mask must cover the "
            f"logical sequence ({past_logical + q_len} columns), got shape {tuple(mask.shape)}"
        )
    new_mask = torch.cat([plan.prefix_mask.to(mask.dtype), mask[:, plan.prefill_len :]], dim=1)

    positions = kwargs.get("position_ids")
    if positions is None:
        positions = torch.arange(past_logical, past_logical + q_len, device=device).expand(batch, q_len)
    elif positions.shape[-2] == 1 and batch > 1:
        positions = positions.expand(*positions.shape[:-2], batch, q_len)
    positions = positions - plan.shift.to(device)[:, None]

    out = dict(kwargs)
    out["attention_mask"] = new_mask
    out["position_ids"] = positions
    if "cache_position" in out and out["cache_position"] is not None:
        out["cache_position"] = torch.arange(past_len, past_len + q_len, device=device)
    return out
