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
alone. Other families are refused at wrap time with the reason (:data:`REFUSALS`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from ..methods import Method, Selection, View
from .attention_tap import _ConfigView, _inner_implementation
from .base import InstanceOverride, bind_arguments

KEEP_KEY = "keep@encoder"
SCORE_KEY = "score@encoder"
STAGES = ("post_encoder", "encoder")

MASK_NAME = "prune_encoder_stage"
_STAGE_ATTR = "_prune_encoder_stage"

SUPPORTED = ("llava", "llava_next")
#: families whose views (encoder batch rows) can keep different counts: padded, the padding masked
RAGGED = ("llava_next",)
REFUSALS = {
    "llava_onevision": "its video frames are pooled 2x2 after the encoder (the selection would have to be whole "
    "pooling windows) and its anyres-max crops are not mapped inside the encoder yet",
    "gemma3": "the encoder's output is average-pooled 4x4 into 256 tokens: kept rows would have to be whole "
    "pooling windows",
    "internvl": "which tiles form one image (its budget) is read off the prompt, and transformers' generate runs "
    "the encoder before the prompt reaches the model; pixel shuffle would also need whole 2x2 units",
    "qwen2_vl": "its encoder packs all patches in one sequence with 2x2 merge units; encoder-stage pruning for "
    "Qwen encoders (whole units, ragged windows) is not built yet",
    "qwen2_5_vl": "windowed attention over a window-permuted sequence with 2x2 merge units; encoder-stage "
    "pruning for Qwen encoders (whole units, ragged windows) is not built yet",
    "qwen2_5_omni": "Qwen2.5-VL-style windowed encoder (not built yet) and a joint audio-visual pool",
    "qwen3_vl": "DeepStack mergers read intermediate encoder blocks and the encoder packs 2x2 merge units; "
    "encoder-stage pruning for Qwen encoders is not built yet",
    "qwen3_5": "Qwen3-VL-style encoder (encoder-stage pruning for Qwen encoders is not built yet)",
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

    def select(self, view: View) -> Selection:
        keep = torch.nonzero((view.signals[KEEP_KEY] > 0.5) & view.valid, as_tuple=True)[0]
        return Selection(keep=keep, score=view.signals.get(SCORE_KEY))


def _layer_modules(vision: nn.Module, attention: list[nn.Module]) -> list[nn.Module]:
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

    def install(self) -> list:
        adapter = self.adapter
        removers = []
        mm = adapter.multimodal_module()
        for modality, name in adapter.feature_functions.items():
            removers.append(_StageCall(self, mm, modality, name).install())
        layers = _layer_modules(adapter.vision_model(), adapter.vision_attention_modules())
        h1 = layers[self.layer].register_forward_hook(functools.partial(_after_cut_layer, self))
        h2 = adapter.model.model.vision_tower.register_forward_hook(functools.partial(_after_tower, self))
        removers.extend([h1.remove, h2.remove])
        if self.ragged:  # views may keep different counts: the layers after the cut mask the padding
            removers += [_install_mask(attn, self) for attn in adapter.vision_attention_modules()[self.layer + 1 :]]
        return removers

    def context(self) -> dict[str, Any] | None:
        ctx = self.state._scratch.get("encoder_stage")
        return ctx if ctx is not None and self.state._collecting is not None else None

    def select_rows(self, ctx: dict[str, Any], device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder rows each view (encoder batch row) keeps: (views, offset + T) long, [CLS] first,
        ascending, and None; or, where views keep different counts (LLaVA-NeXT's crops), padded to the
        longest with row 0 and a (views, offset + T) bool of the real rows. Records the selection as
        the call's ``keep@encoder`` / ``score@encoder`` signals."""
        collected = self.state._collecting
        signals = {k: (torch.cat(v, dim=-1) if len(v) > 1 else v[0]).detach().float().cpu()
                   for k, v in collected.items() if k not in (KEEP_KEY, SCORE_KEY)}
        adapter, method, config = self.adapter, self.method, self.state.config
        keeps, scores = [], []
        for lay in adapter.layouts(ctx["modality"], ctx["args"], signals):
            # the budgets of adapter._select, view by view (the language-model side replays this)
            token_view, token_patch = lay.token_view.cpu(), lay.token_patch.cpu()
            prunable = token_view >= 0
            caps = torch.bincount(token_view[prunable], minlength=len(lay.grids)).tolist()
            budget = config.budget(int(prunable.sum()))
            shares = method.view_budgets(budget, caps, [h * w for h, w in lay.grids], config.budget,
                                         proportional=lay.split == "proportional")
            for v, (h, w) in enumerate(lay.grids):
                n = h * w
                valid = torch.zeros(n, dtype=torch.bool)
                valid[token_patch[token_view == v]] = True
                keep, score = valid.clone(), torch.full((n,), float("nan"))
                if shares[v] < caps[v]:
                    view_signals = {key: sig.float() for key, sig in lay.signals[v].items()}
                    sel = method.select(View(grid=(h, w), budget=shares[v], valid=valid, signals=view_signals,
                                             index=v))
                    keep = torch.zeros(n, dtype=torch.bool)
                    keep[sel.keep.cpu()] = True
                    if sel.score is not None:
                        score = sel.score.cpu().float()
                keeps.append(keep)
                scores.append(score)
        keep = torch.stack(keeps)  # (views, N)
        views = keep.shape[0]
        full = torch.cat([torch.ones(views, self.offset, dtype=torch.bool), keep], dim=1)  # (views, offset + N)
        collected[KEEP_KEY] = [full.float().to(device)]
        collected[SCORE_KEY] = [torch.cat([torch.zeros(views, self.offset), torch.stack(scores)], dim=1).to(device)]
        counts = full.sum(1)
        longest = int(counts.max())
        # stable sort puts each view's kept rows first, ascending; the rest pads to the longest view
        order = torch.sort((~full).to(torch.int8), dim=1, stable=True).indices[:, :longest]
        real = torch.arange(longest)[None, :] < counts[:, None]
        if bool(real.all()):
            return order.to(device), None
        return order.masked_fill(~real, 0).to(device), real.to(device)


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
        scratch["encoder_stage"] = {"modality": self.modality, "args": bind_arguments(bound, args, kwargs)}
        try:
            return self._original(*args, **kwargs)
        finally:
            scratch.pop("encoder_stage", None)


def install(adapter, state, method: Method) -> EncoderStageSelection:
    """Install the encoder-stage hooks; returns what the adapter uses as its method from then on."""
    state._removers.extend(EncoderStage(adapter, method).install())
    return EncoderStageSelection(method)
