"""Drop rows of a sequence and map every later step onto the shorter cache.

Shared by all adapters and by the in-LLM decoder cut: the cut gathers hidden states / embeddings,
the 2-D attention mask and position ids (1-D or multi-axis such as M-RoPE's (3, B, L)) with a
keep-mask and re-pads ragged rows on the left; decode steps get the kept prefix of the mask and
positions that continue from the right logical value.

On a static cache (fixed buffers, built for ``torch.compile`` / CUDA graphs) a decode step gets what
transformers' ``generate`` builds for one: a mask as wide as the cache, here in the cache's physical
columns, and positions computed on the device from the cache's own length tensor, so every step
hands the compiled language model tensors of the same shapes and nothing that changes in Python.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .._compat import call_with_cache, find_cache
from ..state import Plan


@dataclass
class Packing:
    """Where each kept element of a (B, L) keep-mask goes when rows are re-padded on the left:
    element (rows[i], cols[i]) moves to (rows[i], to[i]) of a (B, kept_len) sequence."""

    rows: torch.Tensor
    cols: torch.Tensor
    to: torch.Tensor
    kept_len: int

    @classmethod
    def of(cls, keep_mask: torch.Tensor, counts: list[int] | None = None) -> Packing:
        """``counts``: the kept elements of each row when the caller knows them on the host (from
        budgets, not from the mask): then nothing is read back from the device."""
        # (B,) on the device either way: torch.tensor(counts, device=cuda) is a blocking copy that
        # set_sync_debug_mode('error') refuses (seen on the H200)
        kept = keep_mask.sum(1)
        if counts is None:
            kept_len = int(kept.max()) if kept.numel() else 0
            rows, cols = keep_mask.nonzero(as_tuple=True)
        else:
            kept_len = max(counts, default=0)
            rows, cols = torch.nonzero_static(keep_mask, size=sum(counts)).unbind(1)
        dest = (kept_len - kept)[:, None] + keep_mask.long().cumsum(1) - 1  # (B, L)
        return cls(rows, cols, dest[rows, cols], kept_len)

    def sequence(self, x: torch.Tensor, fill: float = 0) -> torch.Tensor:
        """(B, L, *rest) -> (B, kept_len, *rest); new padding rows hold ``fill``."""
        out = x.new_full((x.shape[0], self.kept_len, *x.shape[2:]), fill)
        out[self.rows, self.to] = x[self.rows, self.cols]
        return out

    def positions(self, x: torch.Tensor) -> torch.Tensor:
        """(..., B, L) -> (..., B, kept_len); new padding positions are 0."""
        out = x.new_zeros(*x.shape[:-1][:-1], x.shape[-2], self.kept_len)
        out[..., self.rows, self.to] = x[..., self.rows, self.cols]
        return out


def cached_call(kwargs: dict[str, Any]) -> bool:
    """The language model's call has a cache: given, or made by the model for ``use_cache=True``."""
    return find_cache(kwargs) is not None or kwargs.get("use_cache") is True


def two_d_mask(mask: Any, columns: int) -> torch.Tensor | None:
    """The (B, columns) 0/1 padding mask behind what transformers hands a language model: a 2-D mask
    as it is; a 4-D one (B, 1, Q, K) (what ``generate`` builds for a static cache) read off its last
    query row, which may attend every real token up to it (bool: True attends; additive: 0 attends);
    a mapping of masks per layer type (Qwen) through its full-attention entry. None stays None."""
    if isinstance(mask, dict):
        mask = mask.get("full_attention", next(iter(mask.values()), None))
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"prune cannot read an attention mask of type {type(mask).__name__}; pass a 2-D mask")
    if mask.ndim == 2:
        return mask
    if mask.ndim == 4:
        row = mask[:, 0, -1, :columns]
        return (row if row.dtype == torch.bool else row == 0).long()
    raise ValueError(f"prune needs a 2-D or 4-D attention mask; got one with shape {tuple(mask.shape)}")


def logical_positions(position_ids: torch.Tensor | None, batch: int, length: int, device, start: int = 0):
    """Positions the unwrapped model would use: (..., B, L)."""
    if position_ids is None:
        return torch.arange(start, start + length, device=device).expand(batch, length)
    if position_ids.shape[-2] == 1 and batch > 1:
        position_ids = position_ids.expand(*position_ids.shape[:-2], batch, length)
    return position_ids


def compact(positions: torch.Tensor, keep_mask: torch.Tensor) -> torch.Tensor:
    """Positions minus the number of removed elements before each one (same shape)."""
    removed = (~keep_mask).long()
    return positions - (removed.cumsum(1) - removed)


def cut_prefill(
    kwargs: dict[str, Any], keep_mask: torch.Tensor, mode: str, counts: list[int] | None = None
) -> tuple[dict[str, Any], Plan, torch.Tensor]:
    """Return new language-model kwargs holding only the kept rows, the decode plan, and the
    position ids given to the kept rows.

    keep_mask: (B, L) bool over the prefill. ``mode`` is "original" or "compact". ``counts``: the
    real (non-padding) kept tokens of each row when the host knows them (then nothing is read back
    from the device; see :meth:`Packing.of`).
    """
    embeds = kwargs["inputs_embeds"]  # (B, L, D)
    batch, length, _ = embeds.shape
    device = embeds.device
    mask = two_d_mask(kwargs.get("attention_mask"), length)  # the model rebuilds 4-D masks from it
    if mask is None:
        mask = torch.ones(batch, length, dtype=torch.long, device=device)
    logical = logical_positions(kwargs.get("position_ids"), batch, length, device)
    keep_mask = keep_mask.to(device)
    # Padding is never kept: rows are re-packed so the new length is the longest row's real tokens
    # (a text-only prompt beside an image prompt no longer holds the batch at the image's length).
    packing = Packing.of(keep_mask & mask.bool(), counts)
    if mode == "compact":
        logical = compact(logical, keep_mask)
        shift = (~keep_mask).long().sum(1)
    else:
        shift = torch.zeros(batch, dtype=torch.long, device=device)
    new_mask = packing.sequence(mask)
    new_positions = packing.positions(logical)
    out = dict(kwargs)
    out["inputs_embeds"] = packing.sequence(embeds)
    # Every row as long as the longest (host counts): no padding, so no mask, as in a prompt given
    # none (the model's own check of a mask, all ones? then SDPA's causal path, reads the device).
    # Only beside a cache (given, or made by the language model for ``use_cache=True``): without one,
    # transformers reads positions that skip (the dropped tokens) as packed sequences when no mask is given.
    uniform = counts is not None and len(set(counts)) <= 1
    out["attention_mask"] = None if uniform and cached_call(kwargs) else new_mask
    out["position_ids"] = new_positions
    if "cache_position" in out and out["cache_position"] is not None:  # transformers < 5.x kept it
        out["cache_position"] = torch.arange(packing.kept_len, device=device)
    plan = Plan(prefill_len=length, kept_len=packing.kept_len, prefix_mask=new_mask, shift=shift)
    return out, plan, new_positions


def map_decode(kwargs: dict[str, Any], plan: Plan, past_len: int, drop: int = 0) -> dict[str, Any]:
    """Language-model kwargs of a call after a pruned prefill, mapped onto the shorter cache: a decode
    step, or a later turn that passes the cache back (its first ``drop`` tokens, which the cache
    already holds logically, are dropped).

    ``past_len`` is the cache's real length; the caller's mask and positions are logical.
    """
    kwargs = dict(kwargs)
    embeds = kwargs["inputs_embeds"]
    if drop:
        if drop >= embeds.shape[1]:
            raise ValueError("past_key_values already holds every token of this call: nothing to run")
        kwargs["inputs_embeds"] = embeds = embeds[:, drop:]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., drop:]
    batch, q_len = embeds.shape[:2]
    device = embeds.device
    past_logical = plan.prefill_len + (past_len - plan.kept_len)
    mask = kwargs.get("attention_mask")
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
        # a 4-D mask built for the cache (static cache): rebuilt from the prefix; tokens after the
        # prefill are never padding (generate extends the mask with ones)
        mask = None
    if mask is None:
        mask = torch.ones(batch, past_logical + q_len, dtype=plan.prefix_mask.dtype, device=device)
    if mask.ndim != 2 or mask.shape[1] != past_logical + q_len:
        raise ValueError(
            f"after a pruned prefill of {plan.prefill_len} tokens the attention mask must cover the "
            f"logical sequence ({past_logical + q_len} columns), got shape {tuple(mask.shape)}"
        )
    new_mask = torch.cat([plan.prefix_mask.to(mask.dtype), mask[:, plan.prefill_len :]], dim=1)
    positions = logical_positions(kwargs.get("position_ids"), batch, q_len, device, start=past_logical)
    positions = positions - plan.shift.to(device)[:, None]
    out = dict(kwargs)
    out["attention_mask"] = new_mask
    out["position_ids"] = positions
    if "cache_position" in out and out["cache_position"] is not None:
        out["cache_position"] = torch.arange(past_len, past_len + q_len, device=device)
    return out


def _decode_positions(kwargs: dict[str, Any], batch: int, q_len: int, device, past_logical) -> torch.Tensor:
    """Logical positions of a decode call: the caller's, or ``past_logical`` (an int or a 0-d device
    tensor) onwards."""
    position_ids = kwargs.get("position_ids")
    if position_ids is None:
        return (torch.arange(q_len, device=device) + past_logical).expand(batch, q_len)
    return logical_positions(position_ids, batch, q_len, device)


def text_positions(positions: torch.Tensor) -> torch.Tensor:
    """The (B, L) positions a mask builder reads: 1-D positions as they are, the text row of Qwen's
    [text; t; h; w] (4, B, L) or the first row of M-RoPE's (3, B, L)."""
    return positions if positions.ndim == 2 else positions[0]


def physical_mask(mask2d: torch.Tensor, capacity: int) -> torch.Tensor:
    """(B, capacity): ``mask2d`` (B, Ls) then ones (a static cache's columns not reached yet)."""
    out = torch.ones(mask2d.shape[0], capacity, dtype=mask2d.dtype, device=mask2d.device)
    out[:, : mask2d.shape[1]] = mask2d
    return out


def static_mask(plan: Plan, capacity: int, columns: torch.Tensor | None = None) -> torch.Tensor:
    """The (B, capacity) padding mask of a static cache after a pruned prefill, in the cache's physical
    columns: the kept prefix, then ``columns`` (the caller's mask after the prefill), then ones (what
    the causal mask does not reach yet). Without ``columns`` it is the same every step: built once."""
    if columns is None and plan.decode_mask is not None and plan.decode_mask.shape[1] == capacity:
        return plan.decode_mask
    prefix = plan.prefix_mask
    if plan.kept_len + (0 if columns is None else columns.shape[1]) > capacity:
        raise ValueError(f"the static cache holds {capacity} tokens: too few for this call after the pruned prefill")
    mask = physical_mask(prefix, capacity)
    if columns is None:
        plan.decode_mask = mask
    else:
        mask[:, plan.kept_len : plan.kept_len + columns.shape[1]] = columns.to(mask.device, mask.dtype)
    return mask


def plain_causal_text(config) -> bool:
    """The language model attends causally over the whole cache in every layer: no sliding window,
    no chunked attention, no per-layer-type masks (then a static decode step's mask is simply
    "padding mask and key <= query"); read off the text config's public fields."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text, "sliding_window", None) or getattr(text, "attention_chunk_size", None):
        return False
    layer_types = getattr(text, "layer_types", None)
    return not layer_types or all(t == "full_attention" for t in layer_types)


def mask_in_form(allowed: torch.Tensor, form: torch.dtype) -> torch.Tensor:
    """A bool mask (True attends) in the form a backend takes: itself for bool, else additive
    (0 where allowed, the dtype's minimum elsewhere)."""
    if form == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=form, device=allowed.device).masked_fill_(~allowed, torch.finfo(form).min)


def static_causal_like(given, physical: torch.Tensor, past, q_len: int) -> torch.Tensor | None:
    """A static decode step's (B, 1, Q, capacity) mask over the physical padding mask ``physical``
    (B, capacity), queries at physical positions ``past`` (an int or the cache's 0-d device length)
    onwards, in the form of ``given`` (the mask ``generate`` built for the step: bool, True attends,
    or additive float). None where ``given`` has another form or shape: the caller then asks the
    model's mask builder. Host cost: a handful of tensor ops, nothing read from the device."""
    if not (isinstance(given, torch.Tensor) and given.ndim == 4 and (given.dtype == torch.bool or given.is_floating_point())):
        return None
    batch, capacity = physical.shape
    if given.shape[0] != batch or given.shape[2] != q_len or given.shape[3] != capacity:
        return None
    device = given.device
    queries = torch.arange(q_len, device=device) + past  # physical positions of this step's tokens
    allowed = torch.arange(capacity, device=device)[None, :] <= queries[:, None]  # (Q, capacity)
    return mask_in_form(allowed[None, None] & physical.to(device).bool()[:, None, None, :], given.dtype)


def map_decode_static(
    kwargs: dict[str, Any], plan: Plan, cache, past, build_mask, config, drop: int = 0,
    plain_causal: bool | None = None,
) -> dict[str, Any]:
    """:func:`map_decode` for a static cache: the same mapping, in the form ``generate`` gives a
    static cache's decode step. ``past`` is the cache's physical length, an int or the cache's own
    0-d length tensor (then nothing is read off the device). ``build_mask(config=, inputs_embeds=,
    attention_mask=, cache=, position_ids=)`` is the model's ``create_masks_for_generate``: it turns
    the physical (B, capacity) padding mask into the model's mask (4-D, bool or additive per backend,
    or one per layer type), as wide as the cache whatever the step. Where the step's own mask (the
    one ``generate`` built) is a plain 4-D tensor and every layer attends causally over the whole
    cache, the mask is built directly in its form (:func:`static_causal_like`): the builder's host
    work happens once per step, not twice. ``plain_causal``: :func:`plain_causal_text` of ``config``,
    when the caller has it (read from the config when None)."""
    kwargs = dict(kwargs)
    embeds = kwargs["inputs_embeds"]
    if drop:
        if drop >= embeds.shape[1]:
            raise ValueError("past_key_values already holds every token of this call: nothing to run")
        kwargs["inputs_embeds"] = embeds = embeds[:, drop:]
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"][..., drop:]
    batch, q_len = embeds.shape[:2]
    device = embeds.device
    past_logical = past + (plan.prefill_len - plan.kept_len)
    mask = kwargs.get("attention_mask")
    columns = None
    if isinstance(mask, torch.Tensor) and mask.ndim == 2:  # a direct call's logical mask (generate gives 4-D)
        if not isinstance(past, torch.Tensor) and mask.shape[1] != past_logical + q_len:
            raise ValueError(
                f"after a pruned prefill of {plan.prefill_len} tokens the attention mask must cover the "
                f"logical sequence ({past_logical + q_len} columns), got shape {tuple(mask.shape)}"
            )
        columns = mask[:, plan.prefill_len :]
    # otherwise the mask generate built for the cache: tokens after the prefill are never padding
    physical = static_mask(plan, int(cache.get_max_length()), columns)
    positions = _decode_positions(kwargs, batch, q_len, device, past_logical) - plan.shift.to(device)[:, None]
    out = dict(kwargs)
    out["position_ids"] = positions
    direct = None
    if plain_causal_text(config) if plain_causal is None else plain_causal:
        if isinstance(mask, dict) and set(mask) == {"full_attention"}:  # models that key masks by layer type
            full = static_causal_like(mask["full_attention"], physical, past, q_len)
            direct = None if full is None else {"full_attention": full}
        else:
            direct = static_causal_like(mask, physical, past, q_len)
    out["attention_mask"] = direct if direct is not None else call_with_cache(
        build_mask, cache, config=config, inputs_embeds=embeds, attention_mask=physical,
        position_ids=text_positions(positions),
    )
    if "cache_position" in out and out["cache_position"] is not None:
        out["cache_position"] = torch.arange(q_len, device=device) + past
    return out
