"""Pruning inside the language model: drop vision rows between decoder layers.

Layers before the first cut see every token; at a cut layer K the hidden states lose the vision
rows the method scores lowest, and every later layer gets the matching attention mask, position ids
and position embeddings (cos, sin; M-RoPE for Qwen). Because each layer only ever sees its own rows,
its KV cache holds exactly those tokens; every decode step gives each layer a mask built for its own
cache length (``create_causal_mask(..., layer_idx=K)``), and positions that continue from the right
logical value ("original") or from the renumbered one ("compact", what the TransPrune reference does).

Signals (all from the layers' own tensors, never ``output_attentions``, never an N x N matrix):
- last-token attention of layer K-1 (FastV): the attention tap on that layer, one query row per
  prompt;
- token transition variation (TransPrune): forward hooks on the sub-layers' inputs and outputs;
- instruction-guided attention (TransPrune; PyramidDrop with the last instruction row only): layer
  K's attention called once in "stats only" mode on the uncut sequence, so only its q and k are
  computed, for the instruction rows.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from .._compat import call_with_cache, is_static_cache
from ..kernels import attention_stats, transition_variation
from ..methods.base import to_device
from .attention_tap import STATS_ONLY_ATTR, install_tap
from .cutter import Packing, compact, logical_positions, mask_in_form, physical_mask, two_d_mask

if TYPE_CHECKING:
    from ..methods.llm import LLMMethod
    from ..state import PruneState


@dataclass
class Stage:
    """The rows that layers ``layer`` .. (next stage's layer - 1) see during one prefill."""

    layer: int
    rows: torch.Tensor  # (B, Ls) column of each row in the language model's input, -1 for added padding
    mask2d: torch.Tensor  # (B, Ls)
    positions: torch.Tensor  # (..., B, Ls) positions as the language model takes them (maybe 4 rows)
    shift: torch.Tensor  # (B,) rows removed so far (subtracted from decode positions in "compact")
    lengths: list[int] = field(default_factory=list)  # host: rows of each prompt (padding included)
    vision_counts: list[int] = field(default_factory=list)  # host: vision rows of each prompt
    embeddings: Any = None  # (cos, sin) for the prefill
    causal: Any = None  # the prefill's 4-D (or backend-specific) mask
    decode_step: int = -1
    decode_kwargs: dict[str, Any] = field(default_factory=dict)
    static_mask: torch.Tensor | None = None  # static cache: (B, capacity) padding mask of this stage's cache


@dataclass
class Context:
    """One prefill and its decode steps."""

    vision: torch.Tensor  # (B, L0) vision rows of the language model's input
    budget: list[int]  # host: vision tokens of each prompt
    stages: list[Stage]
    cache: Any
    ttv: torch.Tensor | None = None  # (B, L0) transition variation accumulated on input columns
    phase: str = "prefill"
    step: int = 0
    lm_mask: torch.Tensor | None = None  # decode: the language model's 2-D mask of this step
    lm_positions: torch.Tensor | None = None  # decode: its positions
    iga_rows: list[torch.Tensor] | torch.Tensor | None = None  # rows the stats-only call reads
    instruction_counts: list[int] = field(default_factory=list)  # host: real rows after the last vision row
    right_aligned: list[bool] = field(default_factory=list)  # host: the prompt's last column is real
    static_decode: dict[int, dict[str, Any]] | None = None  # static cache: this step's kwargs per stage layer
    pending: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)

    def stage_of(self, layer: int) -> Stage:
        current = self.stages[0]
        for stage in self.stages[1:]:
            if stage.layer <= layer:
                current = stage
        return current


def _split_positions(positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rope positions, text positions): Qwen passes [text; t; h; w] as a (4, B, L) tensor."""
    if positions.ndim == 3 and positions.shape[0] == 4:
        return positions[1:], positions[0]
    return positions, positions if positions.ndim == 2 else None


class DecoderCut:
    """Installs and runs the in-LLM cut for one wrapped model."""

    def __init__(self, adapter, method: LLMMethod, state: PruneState) -> None:
        self.adapter, self.method, self.state = adapter, method, state
        self.lm = adapter.language_model()
        self.layers = list(self.lm.layers)
        num_layers = len(self.layers)
        self.schedule = method.schedule(num_layers, state.config.keep)
        self.cut_layers = {layer: i for i, (layer, _) in enumerate(self.schedule)}
        types = getattr(self.lm.config, "layer_types", None) or []
        if any(t != "full_attention" for t in types):
            raise ValueError(f"{method.name} supports language models with full attention in every layer only")

    @property
    def context(self) -> Context | None:
        """The context of the calling thread's current prefill / decode (per call, not per model)."""
        return self.state._context

    @context.setter
    def context(self, ctx: Context | None) -> None:
        self.state._context = ctx

    # ---- installation -------------------------------------------------------------------------
    def install(self) -> None:
        state = self.state
        if not self.schedule:
            return  # keep=1.0: nothing to cut
        first = self.schedule[0][0]
        for index in range(first, len(self.layers)):
            handle = self.layers[index].register_forward_pre_hook(self._layer_hook(index), with_kwargs=True)
            state._removers.append(handle.remove)
        for layer in self.method.last_token_layers(self.schedule):
            state._removers.append(install_tap(self.layers[layer].self_attn, self._last_token_tap(layer)))
        if self.method.instruction_attention():
            for layer, _ in self.schedule:
                state._removers.append(install_tap(self.layers[layer].self_attn, self._instruction_tap(layer)))
        for layer in self.method.transition_layers(self.schedule, len(self.layers)):
            state._removers.extend(self._transition_hooks(layer))

    # ---- called by the adapter's language-model hook -----------------------------------------
    def start_prefill(self, kwargs: dict[str, Any], cache, vision: torch.Tensor,
                      host: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """``host``: the (B, L) placeholder and padding masks of the prompt on the host, when the adapter
        read it before the encoder: the sizes below are then counted there, with no device read."""
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        device = embeds.device
        mask = two_d_mask(kwargs.get("attention_mask"), length)
        mask = torch.ones(batch, length, dtype=torch.long, device=device) if mask is None else mask
        positions = logical_positions(kwargs.get("position_ids"), batch, length, device)
        base = Stage(
            layer=0,
            rows=torch.arange(length, device=device).expand(batch, length),
            mask2d=mask,
            positions=positions,
            shift=torch.zeros(batch, dtype=torch.long, device=device),
        )
        vision = vision.to(device) & mask.bool()
        # each prompt's vision count, its instruction rows (real rows after its last vision row) and
        # whether its last column is real; every later size follows. Counted on the host copy of the
        # prompt when there is one, else the one read of the prefill
        budget, instruction, aligned = _prompt_sizes(*((host[0] & host[1].bool(), host[1]) if host else (vision, mask)))
        base.lengths, base.vision_counts = [length] * batch, list(budget)
        ctx = Context(vision=vision, budget=budget, stages=[base], cache=cache,
                      instruction_counts=instruction, right_aligned=[bool(a) for a in aligned])
        if self.method.transition_layers(self.schedule, len(self.layers)):
            ctx.ttv = torch.zeros(batch, length, device=device)
        self.context = ctx
        if cache is not None:
            try:
                self.state._contexts[cache] = ctx  # a later turn on this cache finds its stages
            except TypeError:  # a legacy tuple cache
                pass

    def start_decode(self, kwargs: dict[str, Any], cache, past_len: int, *known: Context | None) -> None:
        """``known``: the context, when the caller already holds it (a static cache's generate call)."""
        if known:
            ctx = known[0]
        else:
            try:
                ctx = self.state._contexts.get(cache)
            except TypeError:
                ctx = self.context
        self.context = ctx
        if ctx is None:
            return  # the cache came from a prefill that cut nothing
        embeds = kwargs["inputs_embeds"]
        batch, q_len = embeds.shape[:2]
        base = ctx.stages[0]
        ctx.static_decode = None
        if is_static_cache(cache):
            self._start_static_decode(ctx, kwargs, cache, past_len)
            return
        # layers before the first cut see every token, so the cache's length (layer 0) is logical
        past_logical = past_len
        mask = kwargs.get("attention_mask")
        if mask is None or not (isinstance(mask, torch.Tensor) and mask.ndim == 2):
            # none, or a 4-D mask built for the cache (static cache): the prefill's mask, then ones
            # (generate extends the mask with ones; the prefix columns are all that is read)
            mask = torch.ones(batch, past_logical + q_len, dtype=base.mask2d.dtype, device=embeds.device)
            mask[:, : base.mask2d.shape[1]] = base.mask2d
        ctx.phase = "decode"
        ctx.lm_mask = mask
        ctx.lm_positions = logical_positions(kwargs.get("position_ids"), batch, q_len, embeds.device, start=past_logical)
        ctx.step = past_logical + q_len  # identifies this step (per-stage kwargs are built once per step)

    def _start_static_decode(self, ctx: Context, kwargs: dict[str, Any], cache, past) -> None:
        """A decode step on a static cache: every stage's mask, positions (and, "compact", position
        embeddings) built here, outside the compiled language model, in the form ``generate`` gives a
        static cache: masks as wide as the cache in each stage's physical columns (the stage's layers
        cache only its rows), from the cache's length tensors. ``past`` (layer 0's length: logical, as
        the layers before the first cut see every token) may be that 0-d tensor. The layer hooks then
        only pick this step's tensors, so the compiled graph is the same every step."""
        embeds = kwargs["inputs_embeds"]
        batch, q_len = embeds.shape[:2]
        device = embeds.device
        prefill_len = ctx.stages[0].rows.shape[1]
        capacity = int(cache.get_max_length())
        mask = kwargs.get("attention_mask")
        columns = None
        if isinstance(mask, torch.Tensor) and mask.ndim == 2:  # a direct call's logical mask (generate gives 4-D)
            columns = mask[:, prefill_len:]
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            logical = (torch.arange(q_len, device=device) + past).expand(batch, q_len)
        else:
            logical = logical_positions(position_ids, batch, q_len, device)
        if columns is None:
            self.static_masks(ctx, capacity)
        decode = {}
        for stage in ctx.stages[1:]:
            if columns is None:
                mask2d = stage.static_mask
            else:
                mask2d = physical_mask(stage.mask2d, capacity)
                kept = stage.mask2d.shape[1]
                mask2d[:, kept : kept + columns.shape[1]] = columns.to(device, mask2d.dtype)
            positions = logical
            out: dict[str, Any] = {}
            if self.state.positions == "compact":
                positions = positions - stage.shift[:, None]
                out["position_embeddings"] = self._embeddings(embeds, positions)
            text = _split_positions(positions)[1]
            out["position_ids"] = text
            out["attention_mask"] = self._causal(stage, embeds, mask2d, text)
            decode[stage.layer] = out
        ctx.phase = "decode"
        ctx.static_decode = decode

    def static_masks(self, ctx: Context, capacity: int | None = None) -> None:
        """Each stage's (B, capacity) padding mask of a static cache in its physical columns: its rows,
        then ones (what the causal mask does not reach yet); the same every step, so built once."""
        capacity = int(ctx.cache.get_max_length()) if capacity is None else capacity
        for stage in ctx.stages[1:]:
            if stage.static_mask is None or stage.static_mask.shape[1] != capacity:
                stage.static_mask = physical_mask(stage.mask2d, capacity)

    def seen_masks(self) -> list[tuple[int, torch.Tensor]]:
        """(first layer, (B, L0) bool of the input columns that layer and the next ones saw) per stage."""
        ctx = self.context
        out = []
        batch, length = ctx.vision.shape
        for stage in ctx.stages:
            seen = torch.zeros(batch, length + 1, dtype=torch.bool, device=ctx.vision.device)
            rows = stage.rows
            seen.scatter_(1, torch.where(rows >= 0, rows, length), True)  # added padding lands in the spare column
            out.append((stage.layer, seen[:, :length]))
        return out

    # ---- per-layer hook -------------------------------------------------------------------------
    def _layer_hook(self, index: int):
        return functools.partial(self._on_layer, index)

    def _on_layer(self, index: int, module, args, kwargs):
        ctx = self.context
        if ctx is None:
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if ctx.phase == "prefill" and index in self.cut_layers:
            hidden = self._cut(index, hidden, kwargs)
        stage = ctx.stage_of(index)
        if stage.layer == 0:
            return None
        new_kwargs = dict(kwargs)
        if ctx.phase == "prefill":
            new_kwargs.update(attention_mask=stage.causal, position_embeddings=stage.embeddings)
            new_kwargs["position_ids"] = _split_positions(stage.positions)[1]
        else:
            new_kwargs.update(self._decode_kwargs(stage, hidden, kwargs))
        if args:
            return (hidden, *args[1:]), new_kwargs
        new_kwargs["hidden_states"] = hidden
        return args, new_kwargs


    def _causal(self, stage: Stage, hidden: torch.Tensor, mask2d: torch.Tensor, text_positions, given=None):
        """The 4-D mask of a stage's layers. ``given``: the mask transformers built for the layers
        before the cut. Where its form is known (a bool or additive 4-D tensor over a dynamic
        cache, or none at all under SDPA), the stage's mask is built here in the same form: the
        library's builder reads the padding mask back to the host to decide whether it may skip it."""
        mask = causal_like(given, hidden, mask2d, self.context.cache, self.lm.config)
        if mask is not None:
            return mask
        return call_with_cache(
            create_causal_mask,
            self.context.cache,
            config=self.lm.config,
            inputs_embeds=hidden,
            attention_mask=mask2d,
            position_ids=text_positions,
            layer_idx=stage.layer,
        )

    def _embeddings(self, hidden: torch.Tensor, positions: torch.Tensor):
        return self.lm.rotary_emb(hidden, _split_positions(positions)[0])

    def _decode_kwargs(self, stage: Stage, hidden: torch.Tensor, kwargs: dict[str, Any]) -> dict[str, Any]:
        ctx = self.context
        if ctx.static_decode is not None:  # built before the language model ran (static cache)
            return ctx.static_decode[stage.layer]
        if stage.decode_step != ctx.step:  # built once per stage and step
            prefill_len = ctx.stages[0].rows.shape[1]
            mask2d = torch.cat([stage.mask2d.to(ctx.lm_mask.dtype), ctx.lm_mask[:, prefill_len:]], dim=1)
            positions = ctx.lm_positions
            out: dict[str, Any] = {}
            if self.state.positions == "compact":
                positions = positions - stage.shift[:, None]
                out["position_embeddings"] = self._embeddings(hidden, positions)
            text = _split_positions(positions)[1]
            out["position_ids"] = text
            out["attention_mask"] = self._causal(stage, hidden, mask2d, text, kwargs.get("attention_mask"))
            stage.decode_step, stage.decode_kwargs = ctx.step, out
        return stage.decode_kwargs

    # ---- the cut ----------------------------------------------------------------------------------
    def _cut(self, index: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
        ctx = self.context
        prev = ctx.stages[-1]
        stage_no = self.cut_layers[index]
        fraction = self.schedule[stage_no][1]
        valid_rows = prev.rows >= 0
        vision = ctx.vision.gather(1, prev.rows.clamp(min=0)) & valid_rows
        if self.method.instruction_attention():
            self._instruction_attention(index, hidden, prev, kwargs, vision)
        signals = dict(ctx.pending.pop(index, {}))
        if ctx.ttv is not None:
            signals["ttv"] = torch.where(valid_rows, ctx.ttv.gather(1, prev.rows.clamp(min=0)), 0.0)
        signals = {k: v.float() * vision for k, v in signals.items()}  # sums run over vision rows
        score = self.method.score(stage_no, index, signals).float()
        # Sizes from the host's counts, ranking on the device: no read-back between layers.
        targets = [min(n, self.method.kept_count(fraction, budget))
                   for n, budget in zip(prev.vision_counts, ctx.budget)]
        # text and the prompt's own padding stay; padding an earlier cut added is dropped and re-made
        keep = (valid_rows & ~vision) | keep_top(score, vision, targets)
        lengths = [n - (v - t) for n, v, t in zip(prev.lengths, prev.vision_counts, targets)]
        packing = Packing.of(keep, lengths)
        positions = prev.positions
        shift = prev.shift
        if self.state.positions == "compact":
            dropped = vision & ~keep  # only vision rows count: added padding has no position
            positions = compact(positions, ~dropped)
            shift = shift + dropped.long().sum(1)
        new_hidden = packing.sequence(hidden)
        stage = Stage(
            layer=index,
            rows=packing.sequence(prev.rows, fill=-1),
            mask2d=packing.sequence(prev.mask2d),
            positions=packing.positions(positions),
            shift=shift,
            lengths=lengths,
            vision_counts=targets,
        )
        stage.embeddings = self._embeddings(new_hidden, stage.positions)
        stage.causal = self._causal(stage, new_hidden, stage.mask2d, _split_positions(stage.positions)[1],
                                    kwargs.get("attention_mask"))
        ctx.stages.append(stage)
        return new_hidden

    # ---- signals ----------------------------------------------------------------------------------
    def _last_token_tap(self, layer: int):
        return functools.partial(self._on_last_token, layer)

    def _on_last_token(self, layer: int, module, q, k, attention_mask, kwargs):
        ctx = self.context
        if ctx is None or ctx.phase != "prefill":
            return
        stage = ctx.stage_of(layer)
        batch, length = q.shape[0], q.shape[2]
        last = torch.full((batch, 1), length - 1, dtype=torch.long, device=q.device)  # left padding
        k = k[..., :length, :]  # a static cache hands back its whole buffer; the prefill's keys come first
        stats = attention_stats(q.detach(), k.detach(), query_index=last, key_mask=stage.mask2d.bool(),
                                scale=kwargs.get("scaling"))
        ctx.pending.setdefault(layer + 1, {})[f"last@{layer}"] = stats


    def _instruction_tap(self, layer: int):
        return functools.partial(self._on_instruction, layer)

    def _on_instruction(self, layer: int, module, q, k, attention_mask, kwargs):
        ctx = self.context
        if ctx is None or ctx.iga_rows is None:
            return
        mask = ctx.stages[-1].mask2d.bool()
        if isinstance(ctx.iga_rows, torch.Tensor):  # one row per prompt: one batched call
            stats = attention_stats(q.detach(), k.detach(), query_index=ctx.iga_rows, key_mask=mask, causal=True,
                                    scale=kwargs.get("scaling"))
            ctx.pending.setdefault(layer, {})[f"iga@{layer}"] = stats
            return
        out = torch.zeros(q.shape[0], q.shape[2], device=q.device)
        for b, rows in enumerate(ctx.iga_rows):
            out[b] = attention_stats(q[b : b + 1].detach(), k[b : b + 1].detach(), query_index=rows[None],
                                     key_mask=mask[b : b + 1], causal=True, scale=kwargs.get("scaling"))[0]
        ctx.pending.setdefault(layer, {})[f"iga@{layer}"] = out


    def _instruction_attention(self, index, hidden, prev: Stage, kwargs, vision) -> None:
        """Layer ``index``'s attention of the instruction rows on the uncut sequence (q, k only)."""
        ctx = self.context
        layer = self.layers[index]
        last = self.method.instruction_query == "last"  # PyramidDrop: the last instruction token's row only
        length = hidden.shape[1]
        if all(ctx.right_aligned):
            # the instruction rows are each prompt's last ones (a cut packs rows to the right, and
            # text is never cut): their count is known on the host, nothing is read back
            if last:  # the last column, also where a prompt has none (it ends with its media)
                rows = torch.full((hidden.shape[0], 1), length - 1, device=hidden.device)
            else:
                rows = [torch.arange(length - n, length, device=hidden.device) if n else
                        torch.full((1,), length - 1, device=hidden.device) for n in ctx.instruction_counts]
        elif last:
            rows = last_instruction_row(prev.mask2d.bool(), vision)
        else:  # a right-padded prompt (its padding stays after its text): find its rows
            rows = []
            for b in range(hidden.shape[0]):
                real = prev.mask2d[b].bool()
                vis = torch.nonzero(vision[b], as_tuple=True)[0]
                after = torch.arange(hidden.shape[1], device=hidden.device) > (int(vis[-1]) if vis.numel() else -1)
                chosen = torch.nonzero(real & after, as_tuple=True)[0]
                rows.append(chosen if chosen.numel() else torch.tensor([hidden.shape[1] - 1], device=hidden.device))
        causal = prev.causal if prev.layer else kwargs.get("attention_mask")
        embeddings = prev.embeddings if prev.layer else kwargs.get("position_embeddings")
        attn = layer.self_attn
        ctx.iga_rows = rows
        setattr(attn, STATS_ONLY_ATTR, True)
        try:
            with torch.no_grad():
                attn(hidden_states=layer.input_layernorm(hidden), attention_mask=causal,
                     position_embeddings=embeddings)  # no cache: nothing is stored
        finally:
            setattr(attn, STATS_ONLY_ATTR, False)
            ctx.iga_rows = None

    def _transition_hooks(self, index: int) -> list:
        layer = self.layers[index]
        seen: dict[str, torch.Tensor] = {}  # this layer's sub-layer inputs and outputs of the prefill
        handles = [
            layer.input_layernorm.register_forward_hook(functools.partial(self._keep_output, seen, "attn_in")),
            layer.self_attn.register_forward_hook(functools.partial(self._keep_output, seen, "attn_out")),
            layer.post_attention_layernorm.register_forward_hook(functools.partial(self._keep_output, seen, "mlp_in")),
            layer.mlp.register_forward_hook(functools.partial(self._finish_transition, seen, index)),
        ]
        return [h.remove for h in handles]

    def _keep_output(self, seen: dict, name: str, module, args, output) -> None:
        if self.context is not None and self.context.phase == "prefill":
            seen[name] = (output[0] if isinstance(output, tuple) else output).detach()

    def _finish_transition(self, seen: dict, index: int, module, args, output) -> None:
        ctx = self.context
        if ctx is None or ctx.phase != "prefill":
            return
        stage = ctx.stage_of(index)
        valid = stage.mask2d.bool()
        total = 0.0
        for before, after in ((seen["attn_in"], seen["attn_out"]), (seen["mlp_in"], output.detach())):
            ratio, one_minus_cos = transition_variation(before, after)  # (B, Ls) each
            weights = one_minus_cos.masked_fill(~valid, float("-inf")).softmax(-1)  # per prompt
            total = total + ratio * weights
        rows = stage.rows
        ok = rows >= 0  # padding a cut added adds nothing (its 0 lands on column 0)
        ctx.ttv.scatter_add_(1, rows.clamp(min=0), torch.where(ok, total.float(), 0.0))
        seen.clear()


def keep_top(score: torch.Tensor, allowed: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """(B, L) bool: the ``counts[b]`` highest scores of row b among its ``allowed`` positions, ties
    to the lower index (as :func:`prune.methods.base.stable_topk` picks them), ranked on the device.

    Two stable sorts order each row by (allowed first, score descending, index); a position is kept
    when its rank is below its row's count."""
    batch, length = score.shape
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(allowed.gather(1, order).byte(), dim=1, descending=True, stable=True).indices)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(length, device=score.device).expand(batch, length))
    limit = to_device(torch.tensor(counts)[:, None], score.device)  # a pageable copy would wait for the GPU
    return allowed & (rank < limit)


def last_instruction_row(real: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
    """(B, 1): each prompt's last real row after its last vision row, or the sequence's last row when
    there is none, computed on the device (no per-prompt read-back)."""
    length = real.shape[1]
    index = torch.arange(length, device=real.device).expand_as(real)
    last_vision = torch.where(vision, index, -1).amax(1, keepdim=True)
    last_real = torch.where(real & (index > last_vision), index, -1).amax(1, keepdim=True)
    return torch.where(last_real >= 0, last_real, length - 1)



def causal_like(given, hidden: torch.Tensor, mask2d: torch.Tensor, cache, config) -> torch.Tensor | None:
    """A (B, 1, Q, K) causal mask over ``mask2d``'s K keys (the last Q of them are the queries), in
    the form of ``given`` (the mask transformers built for the same call): bool (True attends) or
    additive float. None where the form is not one of those (static cache, flash / flex attention):
    the caller then asks transformers."""
    if cache is not None and not isinstance(cache, DynamicCache):
        return None
    if given is None:  # transformers skipped the mask: SDPA's is_causal (no padding in the base rows)
        if getattr(config, "_attn_implementation", None) != "sdpa":
            return None
        form = torch.bool
    elif isinstance(given, torch.Tensor) and given.ndim == 4 and (given.dtype == torch.bool or given.is_floating_point()):
        form = given.dtype
    else:
        return None
    queries, keys = hidden.shape[1], mask2d.shape[1]
    device = hidden.device
    causal = torch.arange(keys, device=device)[None, :] <= torch.arange(keys - queries, keys, device=device)[:, None]
    return mask_in_form(causal[None, None] & mask2d.bool()[:, None, None, :], form)


def _prompt_sizes(vision: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    """[vision counts, instruction counts, last column real] of each prompt, as host lists."""
    index = torch.arange(vision.shape[1], device=vision.device)
    last_vision = torch.where(vision, index, -1).amax(1, keepdim=True)
    instruction = (mask.bool() & (index > last_vision)).sum(1)
    return torch.stack([vision.sum(1), instruction, mask[:, -1].long()]).tolist()

