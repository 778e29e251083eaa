"""Pruning inside the vision encoder (a method's ``stage="encoder"`` option).

After the encoder layer whose attention the method reads last (``cls``: its CLS layer(s);
``hiprune``: its object layer, registers taken from that same layer unless ``deep_layer`` says
otherwise), the method selects each view's rows there and the remaining encoder layers run on the
kept rows only ([CLS] stays first). The vision tower's outputs are then scattered back to their full
length (zeros where rows were dropped), so the family's own post-encoder code (feature-layer choice,
[CLS] removal, projector) and the prompt's placeholder layout stay untouched; the language-model cut
drops exactly the rows that the encoder dropped (the selection travels to it as two extra "signals"
of the encoder call, ``keep@encoder`` and ``score@encoder``), so the language model reads exactly the
kept rows, in their original order, with the positions of the method's position mode.

Supported: LLaVA-1.5-style models (``LlavaForConditionalGeneration``) with a full-attention ViT
(CLIP, SigLIP, DINOv2): one view per image, every image of a call the same grid and budget, so every
row of the encoder batch keeps the same count and no padding is needed. LLaVA-NeXT: the base image
and the crops are rows of one encoder batch and keep different counts (unpadding, the budget split
over views), so the kept rows are padded to the longest view and the encoder layers after the cut
see the padding masked as keys (their attention modules point at :func:`_masked_attention`, the
model's own eager / SDPA function with that mask added); each view's rows are what they would be
alone. The packed Qwen encoders (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5): whole 2x2 merge units are
dropped from the one packed sequence and the later blocks' arguments are mapped to the survivors
(:class:`PackedEncoderStage`). Other families are refused at wrap time with the reason
(:data:`REFUSALS`).

For every family the language-model side does not select again: :class:`EncoderStageSelection`
reads the selection made inside the encoder back from the call's ``keep@encoder`` signal.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..methods import Method, Selection, View
from ..methods.base import BatchSelection, ViewBatch, to_device
from .attention_tap import _ConfigView, _inner_implementation
from .base import (
    InstanceOverride,
    bind_arguments,
    host_shape_arguments,
    joined_signals,
    plan_views,
    rank_views,
)

KEEP_KEY = "keep@encoder"
SCORE_KEY = "score@encoder"
STAGES = ("post_encoder", "encoder")

MASK_NAME = "prune_encoder_stage"
_STAGE_ATTR = "_prune_encoder_stage"

SUPPORTED = ("llava", "llava_next", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
#: families whose encoder packs every image of a call in one sequence of 2x2 merge units (Qwen)
PACKED = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_5")
#: families whose views (encoder batch rows) can keep different counts: padded, the padding masked
RAGGED = ("llava_next",)
REFUSALS = {
    "llava_onevision": "its video frames are pooled 2x2 after the encoder (the selection would have to be whole "
    "pooling windows) and its anyres-max crops are not mapped inside the encoder yet",
    "gemma3": "the encoder's output is average-pooled 4x4 into 256 tokens: kept rows would have to be whole "
    "pooling windows",
    "internvl": "which tiles form one image (its budget) is read off the prompt, and transformers' generate runs "
    "the encoder before the prompt reaches the model; pixel shuffle would also need whole 2x2 units",
    "qwen2_5_omni": "its thinker's vision side is pooled jointly with audio (avpool) and its encoder hooks are "
    "not mapped inside the encoder yet",
}


def stage_of(method: Method) -> str:
    return method.options.get("stage", "post_encoder")


def check_encoder_stage(adapter, method: Method) -> None:
    """Refuse ``stage="encoder"`` where it cannot run (raises ValueError naming ``stage``)."""
    if stage_of(method) != "encoder":
        return
    family = adapter.family
    if family not in SUPPORTED:
        why = REFUSALS.get(family, "prune cannot prune inside this family's vision encoder")
        raise ValueError(
            f"{method.name} option stage='encoder' is not supported on {type(adapter.model).__name__} ({family}): "
            f"{why}. Use stage='post_encoder' (the default)"
        )


def cut_layer(method: Method) -> int:
    """The encoder layer after which rows are dropped: the last one the method reads."""
    return max(req.layer for req in method.requests)


class EncoderStageSelection:
    """Stands for the method on the language-model side: a view's selection is the one made inside
    the encoder (read from its ``keep@encoder`` signal); everything else is the method's own."""

    def __init__(self, method: Method) -> None:
        self._method = method

    def __getattr__(self, name: str) -> Any:
        if name == "_method":  # during unpickling, before __init__'s attribute exists
            raise AttributeError(name)
        return getattr(self._method, name)

    #: the encoder call's signals the language-model side hands to :meth:`select_batch` too
    signal_keys = (KEEP_KEY, SCORE_KEY)
    #: the answer is read off those signals, whatever the method's own ``host_select`` says: never kept
    #: with the host plan of a call (``Adapter._call_plan``)
    host_select = False

    def select(self, view: View) -> Selection:
        keep = torch.nonzero((view.signals[KEEP_KEY] > 0.5) & view.valid, as_tuple=True)[0]
        return Selection(keep=keep, score=view.signals.get(SCORE_KEY))

    def select_batch(self, batch: ViewBatch) -> BatchSelection:
        """The rows the encoder kept, for every view at once; each view kept exactly its budget there
        (the same budgets: host counts, no read). Without the encoder's record (an encoder call the
        stage did not cut), the method's own batched selection."""
        if KEEP_KEY not in batch.signals:
            return self._method.select_batch(batch)
        keep = (batch.signals[KEEP_KEY] > 0.5) & batch.valid
        return BatchSelection(keep=keep, counts=list(batch.budgets), score=batch.signals.get(SCORE_KEY))


def layer_modules(vision: nn.Module, attention: list[nn.Module]) -> list[nn.Module]:
    """The encoder layer that holds each attention module (the ModuleList whose i-th entry holds the
    i-th attention module)."""
    for module in vision.modules():
        if isinstance(module, nn.ModuleList) and len(module) == len(attention):
            if all(any(m is attn for m in layer.modules()) for layer, attn in zip(module, attention)):
                return list(module)
    raise ValueError("stage='encoder': cannot find the vision encoder's layer list")


class EncoderStage:
    """The hooks of one wrapped model's encoder-stage pruning (installed by :func:`install`)."""

    def __init__(self, adapter, method: Method) -> None:
        self.adapter, self.method = adapter, method
        self.layer = cut_layer(method)
        self.offset = adapter.patch_offset()  # [CLS] column
        self.ragged = adapter.family in RAGGED

    @property
    def state(self):
        return self.adapter.state

    def install_calls(self) -> list:
        """The feature-function overrides that mark each encoder call (its shape arguments read)."""
        mm = self.adapter.multimodal_module()
        return [_StageCall(self, mm, modality, name).install() for modality, name in self.adapter.feature_functions.items()]

    def install(self) -> list:
        adapter = self.adapter
        removers = self.install_calls()
        layers = layer_modules(adapter.vision_model(), adapter.vision_attention_modules())
        h1 = layers[self.layer].register_forward_hook(functools.partial(_after_cut_layer, self))
        h2 = adapter.model.model.vision_tower.register_forward_hook(functools.partial(_after_tower, self))
        removers.extend([h1.remove, h2.remove])
        if self.ragged:  # views may keep different counts: the layers after the cut mask the padding
            removers += [_install_mask(attn, self) for attn in adapter.vision_attention_modules()[self.layer + 1 :]]
        return removers

    def context(self) -> dict[str, Any] | None:
        ctx = self.state._scratch.get("encoder_stage")
        return ctx if ctx is not None and self.state._collecting is not None else None

    def view_choices(self, ctx: dict[str, Any], device) -> list[tuple[torch.Tensor, torch.Tensor, int | None]]:
        """Each view's keep (n,) bool and score (n,) fp32 on ``device``, and the count it keeps as the
        host knows it (None: data-dependent), in the layouts' order: the budgets of the post-encoder
        selection (:func:`plan_views`), one batched selection of every view that needs ranking
        (:func:`rank_views`, the method's ``select_batch``) on the statistics collected so far in
        this encoder call. Nothing is read back from the device."""
        collected = self.state._collecting
        signals = {k: v.detach().float() for k, v in joined_signals(collected).items() if k not in (KEEP_KEY, SCORE_KEY)}
        layouts = self.adapter.layouts(ctx["modality"], ctx["args"], signals)
        views, ranked = [], []  # views: (valid (n,) host, its row among the ranked or None, host count)
        for i, lay in enumerate(layouts):
            token_view, token_patch, caps, _, shares = plan_views(self.method, self.state.config, lay)
            for v, (h, w) in enumerate(lay.grids):
                valid = torch.zeros(h * w, dtype=torch.bool)
                valid[token_patch[token_view == v]] = True
                if shares[v] < caps[v]:
                    views.append((valid, len(ranked), shares[v]))
                    ranked.append((i, v, shares[v]))
                else:  # the whole view fits its budget: nothing to rank
                    views.append((valid, None, int(valid.sum())))
        sel = None
        if ranked:
            masks = [mask for mask, row, _ in views if row is not None]  # in the ranked rows' order
            valid = torch.nn.utils.rnn.pad_sequence(masks, batch_first=True)  # (V, widest) bool, False-padded
            sel = rank_views(self.method, layouts, ranked, valid, device)
        choices = []
        for mask, row, count in views:
            n = mask.numel()
            if row is None:
                choices.append((to_device(mask, device), torch.full((n,), float("nan"), device=device), count))
                continue
            score = sel.score[row, :n].float() if sel.score is not None else torch.full((n,), float("nan"), device=device)
            choices.append((sel.keep[row, :n], score, None if sel.counts is None else sel.counts[row]))
        return choices

    def select_rows(self, ctx: dict[str, Any], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder rows each view (encoder batch row) keeps: (views, offset + T) long, [CLS] first,
        ascending, and None; or, where views keep different counts (LLaVA-NeXT's crops), padded to the
        longest with row 0 and a (views, offset + T) bool of the real rows. Records the selection as
        the call's ``keep@encoder`` / ``score@encoder`` signals. On the device, sizes from the host
        counts: no read back unless the method's count is data-dependent."""
        choices = self.view_choices(ctx, device)
        keep = torch.stack([k for k, _, _ in choices])  # (views, N)
        views = keep.shape[0]
        full = torch.cat([keep.new_ones(views, self.offset), keep], dim=1)  # (views, offset + N)
        collected = self.state._collecting
        collected[KEEP_KEY] = [full.float()]
        scores = torch.stack([s for _, s, _ in choices])
        collected[SCORE_KEY] = [torch.cat([scores.new_zeros(views, self.offset), scores], dim=1)]
        counts = [c for _, _, c in choices]
        if None in counts:  # a data-dependent count: read back (one sync)
            counts = full.sum(1).tolist()
        else:
            counts = [c + self.offset for c in counts]
        longest = max(counts)
        # stable sort puts each view's kept rows first, ascending; the rest pads to the longest view
        order = torch.sort((~full).to(torch.int8), dim=1, stable=True).indices[:, :longest]
        if min(counts) == longest:
            return order, None
        real = to_device(torch.arange(longest)[None, :] < torch.tensor(counts)[:, None], device)
        return order.masked_fill(~real, 0), real


def _after_cut_layer(stage: EncoderStage, module, args, output):
    ctx = stage.context()
    if ctx is None or "rows" in ctx:
        return None
    hidden = output[0] if isinstance(output, tuple) else output  # (views, S, D)
    rows, real = stage.select_rows(ctx, hidden.device)
    if real is not None and not stage.ragged:
        raise RuntimeError(f"stage='encoder': the views of this {stage.adapter.family} call keep different counts")
    ctx["rows"], ctx["real"], ctx["length"] = rows, real, hidden.shape[1]
    gathered = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    return (gathered, *output[1:]) if isinstance(output, tuple) else gathered


def _scatter(value: Any, rows: torch.Tensor, length: int) -> Any:
    """A (views, kept, D) tensor back to (views, length, D), zeros where rows were dropped; ``rows``
    equal to ``length`` (padding) land in a spare row that is cut off."""
    if isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[:2] == rows.shape:
        full = value.new_zeros(value.shape[0], length + 1, value.shape[2])
        index = rows[..., None].expand(-1, -1, value.shape[2]).to(value.device)
        return full.scatter(1, index, value)[:, :length]
    if isinstance(value, tuple):
        return tuple(_scatter(v, rows, length) for v in value)
    return value


def _after_tower(stage: EncoderStage, module, args, output):
    ctx = stage.context()
    if ctx is None or "rows" not in ctx:
        return None
    rows, real, length = ctx.pop("rows"), ctx.pop("real"), ctx.pop("length")
    if rows.shape[1] == length:
        return None
    if real is not None:
        rows = rows.masked_fill(~real, length)
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return _scatter(output, rows, length)
    for key in list(output.keys()):
        output[key] = _scatter(output[key], rows, length)
    return output


def _masked_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The module's own attention with the padding rows of a ragged encoder batch masked as keys."""
    stage = getattr(module, _STAGE_ATTR)
    ctx = stage.context()
    real = None if ctx is None else ctx.get("real")
    if real is not None:
        if real.shape != (query.shape[0], key.shape[2]):
            raise RuntimeError(f"stage='encoder': key mask {tuple(real.shape)} does not fit keys {tuple(key.shape)}")
        if "flash" in str(module.config._prune_base._attn_implementation):
            raise RuntimeError("stage='encoder' with views of different kept counts needs eager or sdpa attention")
        pad = torch.zeros(real.shape, dtype=query.dtype, device=query.device)
        pad = pad.masked_fill(~real, torch.finfo(query.dtype).min)[:, None, None, :]  # (views, 1, 1, keys)
        attention_mask = pad if attention_mask is None else attention_mask + pad
    return _inner_implementation(module)(module, query, key, value, attention_mask, **kwargs)


class _MaskedView(_ConfigView):
    _prune_name = MASK_NAME

    @staticmethod
    def register() -> None:
        if MASK_NAME not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(MASK_NAME, _masked_attention)


def _masked_view(base: Any) -> _MaskedView:
    _MaskedView.register()
    return _MaskedView(base)


def _install_mask(module: nn.Module, stage: EncoderStage):
    """Point a layer after the cut at :func:`_masked_attention` (through a view of its config)."""
    if isinstance(module.config, _ConfigView):
        raise RuntimeError(f"{type(module).__name__} is already redirected")
    original = module.config
    module.config = _masked_view(original)
    setattr(module, _STAGE_ATTR, stage)
    return functools.partial(_remove_mask, module, original)


def _remove_mask(module: nn.Module, original: Any) -> None:
    module.config = original
    if hasattr(module, _STAGE_ATTR):
        delattr(module, _STAGE_ATTR)


class _StageCall(InstanceOverride):
    """The feature function, outermost: notes the call's arguments for the cut layer's hook."""

    def __init__(self, stage: EncoderStage, module: nn.Module, modality: str, name: str) -> None:
        super().__init__(module, name)
        self.stage, self.modality = stage, modality

    def __call__(self, *args, **kwargs):
        scratch = self.stage.state._scratch
        outer = scratch.get("encoder_stage")
        if outer is not None:  # a feature function called by another: the outer call's cut applies
            return self._original(*args, **kwargs)
        bound = getattr(type(self.module), self.name).__get__(self.module)
        args_host = host_shape_arguments(bind_arguments(bound, args, kwargs))  # grids: read before the encoder runs
        scratch["encoder_stage"] = {"modality": self.modality, "args": args_host}
        try:
            return self._original(*args, **kwargs)
        finally:
            scratch.pop("encoder_stage", None)


class PackedEncoderStage(EncoderStage):
    """Encoder-stage pruning of a packed Qwen ViT: one (S, D) sequence of every image and temporal
    slice of the call, each LLM token a 2x2 merge unit of consecutive rows (after Qwen2.5-VL's window
    permutation: whole units, in window order).

    Right after the cut block, each view's selection (made on the raster merged grid, as the
    post-encoder method makes it) drops whole merge units; the blocks after the cut run on the
    surviving rows only. Their arguments are mapped by what they are, not by name: a floating tensor
    whose first dimension is the sequence (the rotary cos / sin, or older releases' rotary table) keeps
    the surviving rows, and a 1-D integer tensor is a segment boundary list (``cu_seqlens``: images,
    temporal slices, Qwen2.5-VL's windows), which becomes the boundaries of the survivors, so a
    windowed block attends inside its original window over the units left in it (a window left empty
    is removed from the list) and a full-attention block over every survivor of its image. Survivors keep their rotary
    (h, w) positions because their cos / sin rows are the original ones. Blocks whose output is read
    outside the block loop (the last one: the merger; Qwen3-VL's DeepStack blocks) scatter it back to
    the full sequence, zeros at the dropped rows, so the merger, the window un-permutation and the
    DeepStack mergers run unchanged; the next block picks the surviving rows up again without a copy.
    The language-model cut then drops exactly the dropped units (``keep@encoder``)."""

    def install(self) -> list:
        adapter = self.adapter
        removers = self.install_calls()
        layers = layer_modules(adapter.visual(), adapter.vision_attention_modules())
        hooks = [layers[self.layer].register_forward_hook(functools.partial(_packed_after_cut, self))]
        for index in range(self.layer + 1, len(layers)):
            hooks.append(layers[index].register_forward_pre_hook(functools.partial(_packed_before_block, self),
                                                                 with_kwargs=True))
        readouts = {len(layers) - 1, *adapter.vision_readout_layers()}
        for index in sorted(i for i in readouts if i >= self.layer):
            hooks.append(layers[index].register_forward_hook(functools.partial(_packed_scatter, self)))
        removers.extend(h.remove for h in hooks)
        return removers

    def device_bounds(self) -> bool:
        """Whether the blocks after the cut take their segment boundaries on the device: under prune's
        one-call segmented attention (it takes empty segments and never reads them back); otherwise
        transformers splits the segments on the host and fails on an empty one."""
        return self.state.vision_attention == "segmented"

    def select_units(self, ctx: dict[str, Any], length: int, device) -> tuple[torch.Tensor, int | None]:
        """(S,) bool on ``device``: the sequence rows (encoder order) of the kept merge units, and how
        many they are as the host knows it (None: the method's count is data-dependent). Records the
        selection as the call's ``keep@encoder`` / ``score@encoder`` signals, per row."""
        choices = self.view_choices(ctx, device)
        keep = torch.cat([k for k, _, _ in choices])  # (units,) raster order, view after view
        score = torch.cat([s for _, s, _ in choices])
        unit = self.adapter.merge_size() ** 2
        if keep.numel() * unit != length:
            raise RuntimeError(f"stage='encoder': {keep.numel()} merge units of {unit} rows do not make the "
                               f"encoder's {length} rows")
        order = self.adapter.unit_order(self.adapter.grid_of(ctx["modality"], ctx["args"]))  # raster unit -> encoder position (None: the same)
        if order is not None:
            order = to_device(order, device)
            keep = torch.zeros_like(keep).index_copy_(0, order, keep)
            score = torch.zeros_like(score).index_copy_(0, order, score)
        rows = keep.repeat_interleave(unit)
        collected = self.state._collecting
        collected[KEEP_KEY] = [rows.float()[None]]  # (1, S): the shape of the encoder's statistics
        collected[SCORE_KEY] = [score.repeat_interleave(unit)[None]]
        counts = [c for _, _, c in choices]
        return rows, None if None in counts else sum(counts) * unit


def _packed_after_cut(stage: PackedEncoderStage, module, args, output):
    ctx = stage.context()
    if ctx is None or "rows" in ctx:
        return None
    hidden = output[0] if isinstance(output, tuple) else output  # (S, D)
    if hidden.dim() != 2:
        raise RuntimeError(f"stage='encoder': expected the packed (S, D) sequence after the cut block, got "
                           f"{tuple(hidden.shape)}")
    length = hidden.shape[0]
    kept, count = stage.select_units(ctx, length, hidden.device)
    if count is None:  # the method's count is data-dependent: read back (one sync)
        count = int(kept.sum())
    rows = torch.nonzero_static(kept, size=count)[:, 0]  # ascending, sized from the host count
    prefix = torch.nn.functional.pad(kept.long().cumsum(0), (1, 0))  # (S + 1,) survivors before each row
    device_bounds = stage.device_bounds()
    if not device_bounds:  # transformers splits the segments on the host: bounds on the host
        prefix = prefix.cpu()
    ctx.update(rows=rows, length=length, prefix=prefix, device_bounds=device_bounds, mapped={}, scattered=None)
    gathered = hidden.index_select(0, rows)
    stage.adapter._select_at_encoder_cut(ctx["modality"], ctx["args"])  # the language model's selection, now
    return (gathered, *output[1:]) if isinstance(output, tuple) else gathered


def _packed_map(ctx: dict[str, Any], value: Any) -> Any:
    """A block argument, mapped to the surviving rows (see :class:`PackedEncoderStage`)."""
    if isinstance(value, (tuple, list)):
        return type(value)(_packed_map(ctx, v) for v in value)
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    scattered = ctx["scattered"]
    if scattered is not None and value is scattered[0]:
        return scattered[1]  # the previous block's output, scattered for readers outside the loop
    length = ctx["length"]
    integer = not value.is_floating_point() and value.dtype != torch.bool
    if not (integer and value.dim() == 1 and value.numel() <= length + 1) and value.shape[0] != length:
        return value
    hit = ctx["mapped"].get(id(value))
    if hit is not None and hit[0] is value:  # every block shares these tensors: mapped once per call
        return hit[1]
    if integer and value.dim() == 1:  # segment boundaries: the survivors before each boundary
        prefix = ctx["prefix"]
        if ctx["device_bounds"]:  # one-call segmented attention: empty segments are fine
            mapped = prefix[value.long()].to(value.dtype)
        else:
            # On the host, once per call and tensor (transformers reads them back per block anyway,
            # for the split lengths): emptied segments (a window whose units were all dropped) are
            # removed, because transformers' per-segment SDPA / eager paths fail on a zero-length one.
            bounds = torch.unique_consecutive(prefix[value.cpu().long()])
            mapped = bounds.to(device=value.device, dtype=value.dtype)
    else:
        mapped = value.index_select(0, ctx["rows"].to(value.device))
    ctx["mapped"][id(value)] = (value, mapped)
    return mapped


def _packed_before_block(stage: PackedEncoderStage, module, args, kwargs):
    ctx = stage.context()
    if ctx is None or "rows" not in ctx:
        return None
    return tuple(_packed_map(ctx, a) for a in args), {k: _packed_map(ctx, v) for k, v in kwargs.items()}


def _packed_scatter(stage: PackedEncoderStage, module, args, output):
    ctx = stage.context()
    if ctx is None or "rows" not in ctx:
        return None
    hidden = output[0] if isinstance(output, tuple) else output
    rows = ctx["rows"]
    if hidden.shape[0] != rows.numel():
        return None
    full = hidden.new_zeros(ctx["length"], *hidden.shape[1:]).index_copy_(0, rows.to(hidden.device), hidden)
    ctx["scattered"] = (full, hidden)
    return (full, *output[1:]) if isinstance(output, tuple) else full


def install(adapter, state, method: Method) -> EncoderStageSelection:
    """Install the encoder-stage hooks; returns what the adapter uses as its method from then on."""
    stage = (PackedEncoderStage if adapter.family in PACKED else EncoderStage)(adapter, method)
    state._removers.extend(stage.install())
    return EncoderStageSelection(method)
