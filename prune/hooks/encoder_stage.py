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
row of the encoder batch keeps the same count and no padding is needed. Other families are refused
at wrap time with the reason (:data:`REFUSALS`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from ..methods import Method, Selection, View
from .base import InstanceOverride, bind_arguments

KEEP_KEY = "keep@encoder"
SCORE_KEY = "score@encoder"
STAGES = ("post_encoder", "encoder")

SUPPORTED = ("llava",)
REFUSALS = {
    "llava_next": "its base image and crops go through the encoder as one batch, and unpadding leaves the crops "
    "different numbers of patches, so their kept counts differ per view (a padded, masked encoder batch is not "
    "built yet)",
    "llava_onevision": "anyres crops are unpadded (ragged kept counts per view) and video frames are pooled 2x2 "
    "after the encoder (the selection would have to be whole pooling windows)",
    "gemma3": "the encoder's output is average-pooled 4x4 into 256 tokens: kept rows would have to be whole "
    "pooling windows",
    "internvl": "pixel shuffle merges each 2x2 unit into one token (the selection would have to be whole units) "
    "and a budget split over tiles differs by one token between tiles (ragged encoder batch)",
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
        return removers

    def context(self) -> dict[str, Any] | None:
        ctx = self.state._scratch.get("encoder_stage")
        return ctx if ctx is not None and self.state._collecting is not None else None

    def select_rows(self, ctx: dict[str, Any], device) -> torch.Tensor:
        """(views, offset + T) long: the encoder rows each view keeps ([CLS] first), ascending. Records
        the selection as the call's ``keep@encoder`` / ``score@encoder`` signals."""
        collected = self.state._collecting
        signals = {k: (torch.cat(v, dim=-1) if len(v) > 1 else v[0]).detach().float().cpu()
                   for k, v in collected.items() if k not in (KEEP_KEY, SCORE_KEY)}
        adapter, method, config = self.adapter, self.method, self.state.config
        layouts = adapter.layouts(ctx["modality"], ctx["args"], signals)
        keeps, scores = [], []
        for lay in layouts:
            if len(lay.grids) != 1:
                raise RuntimeError("stage='encoder' supports one view per image")
            (h, w), n = lay.grids[0], lay.grids[0][0] * lay.grids[0][1]
            token_view, token_patch = lay.token_view.cpu(), lay.token_patch.cpu()
            prunable = token_view >= 0
            caps = torch.bincount(token_view[prunable], minlength=1).tolist()
            budget = config.budget(int(prunable.sum()))
            shares = method.view_budgets(budget, caps, [n], config.budget, proportional=lay.split == "proportional")
            valid = torch.zeros(n, dtype=torch.bool)
            valid[token_patch[token_view == 0]] = True
            keep, score = valid.clone(), torch.full((n,), float("nan"))
            if shares[0] < caps[0]:
                view_signals = {key: sig.float() for key, sig in lay.signals[0].items()}
                sel = method.select(View(grid=(h, w), budget=shares[0], valid=valid, signals=view_signals))
                keep = torch.zeros(n, dtype=torch.bool)
                keep[sel.keep.cpu()] = True
                if sel.score is not None:
                    score = sel.score.cpu().float()
            keeps.append(keep)
            scores.append(score)
        keep = torch.stack(keeps)  # (views, N)
        counts = keep.sum(1)
        if bool((counts != counts[0]).any()):
            raise RuntimeError(f"stage='encoder': the views keep different numbers of rows {counts.tolist()}")
        lead = torch.ones(keep.shape[0], self.offset, dtype=torch.bool)
        full = torch.cat([lead, keep], dim=1)  # (views, offset + N)
        pad = torch.zeros(keep.shape[0], self.offset)
        collected[KEEP_KEY] = [full.float().to(device)]
        collected[SCORE_KEY] = [torch.cat([pad, torch.stack(scores)], dim=1).to(device)]
        rows = torch.nonzero(full, as_tuple=True)[1].view(keep.shape[0], -1)  # ascending per view
        return rows.to(device)


def _after_cut_layer(stage: EncoderStage, module, args, output):
    ctx = stage.context()
    if ctx is None or "rows" in ctx:
        return None
    hidden = output[0] if isinstance(output, tuple) else output  # (views, S, D)
    rows = stage.select_rows(ctx, hidden.device)
    ctx["rows"], ctx["length"] = rows, hidden.shape[1]
    gathered = hidden.gather(1, rows[..., None].expand(-1, -1, hidden.shape[-1]))
    return (gathered, *output[1:]) if isinstance(output, tuple) else gathered


def _scatter(value: Any, rows: torch.Tensor, length: int) -> Any:
    """A (views, kept, D) tensor back to (views, length, D), zeros where rows were dropped."""
    if isinstance(value, torch.Tensor) and value.dim() == 3 and value.shape[:2] == rows.shape:
        full = value.new_zeros(value.shape[0], length, value.shape[2])
        return full.scatter(1, rows[..., None].expand(-1, -1, value.shape[2]).to(value.device), value)
    if isinstance(value, tuple):
        return tuple(_scatter(v, rows, length) for v in value)
    return value


def _after_tower(stage: EncoderStage, module, args, output):
    ctx = stage.context()
    if ctx is None or "rows" not in ctx:
        return None
    rows, length = ctx.pop("rows"), ctx.pop("length")
    if rows.shape[1] == length:
        return None
    if isinstance(output, tuple) and not hasattr(output, "keys"):
        return _scatter(output, rows, length)
    for key in list(output.keys()):
        output[key] = _scatter(output[key], rows, length)
    return output


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
