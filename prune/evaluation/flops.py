"""Analytic FLOPs of a language-model prefill for the tokens each decoder layer actually saw.

A multiply-add counts 2 FLOPs. Per decoder layer with n tokens (hidden d, H query heads and Hk
key/value heads of size dh, MLP width f):

    q, o projections      2 * 2 * n * d * (H * dh)
    k, v projections      2 * 2 * n * d * (Hk * dh)
    scores and weighting  2 * 2 * n * n * H * dh        (the full n x n products, as kernels compute them)
    gated MLP             3 * 2 * n * d * f             (gate, up, down; 2 * 2 * n * d * f when not gated)

The projections and the MLP are linear in n: their per-token cost times the vision tokens a layer
saw is that layer's "vision-token linear FLOPs", the quantity the equal-FLOPs convention of in-LLM
methods averages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class LayerFlops:
    tokens: int
    vision_tokens: int
    attention: float  # projections + scores
    mlp: float
    vision_linear: float  # per-token linear FLOPs x vision tokens

    @property
    def total(self) -> float:
        return self.attention + self.mlp


def _text_config(config):
    return getattr(config, "text_config", None) or config


def _shape(config) -> tuple[int, int, int, int, int, bool]:
    cfg = _text_config(config)
    d = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or d // heads
    gated = getattr(cfg, "hidden_act", "silu") in ("silu", "swiglu") or getattr(cfg, "model_type", "") in (
        "llama", "qwen2", "qwen2_vl", "qwen2_5_vl", "qwen2_vl_text", "qwen2_5_vl_text", "mistral")
    return d, heads, kv_heads, head_dim, cfg.intermediate_size, gated


def linear_flops_per_token(config) -> float:
    d, heads, kv_heads, head_dim, f, gated = _shape(config)
    projections = 2 * 2 * d * heads * head_dim + 2 * 2 * d * kv_heads * head_dim
    return projections + (3 if gated else 2) * 2 * d * f


def prefill_flops(
    config, tokens_per_layer: Sequence[int], vision_per_layer: Sequence[int] | None = None
) -> list[LayerFlops]:
    """FLOPs of each decoder layer of one prompt's prefill.

    Args:
        config: the model (or text) config.
        tokens_per_layer: tokens each layer saw (padding excluded).
        vision_per_layer: of which vision tokens (zeros when None).
    """
    d, heads, kv_heads, head_dim, f, gated = _shape(config)
    vision_per_layer = vision_per_layer or [0] * len(tokens_per_layer)
    per_token = linear_flops_per_token(config)
    mlp_per_token = (3 if gated else 2) * 2 * d * f
    out = []
    for n, v in zip(tokens_per_layer, vision_per_layer):
        attention = (per_token - mlp_per_token) * n + 2 * 2 * n * n * heads * head_dim
        out.append(LayerFlops(tokens=n, vision_tokens=v, attention=float(attention), mlp=float(mlp_per_token * n),
                              vision_linear=float(per_token * v)))
    return out


def record_flops(model, record, sample: int = 0) -> list[LayerFlops]:
    """Per-layer prefill FLOPs of one prompt of ``model.prune_state.last`` (or any PruneRecord)."""
    cfg = _text_config(model.config)
    num_layers = cfg.num_hidden_layers
    real = ~record.padding[sample] if record.padding is not None else torch.ones_like(record.keep_mask[sample])
    vision = torch.zeros_like(real)
    for im in record.images:
        if im.sample == sample:
            vision[im.positions] = True
    tokens, vision_tokens = [], []
    for layer in range(num_layers):
        seen = record.seen_by(layer)[sample] & real
        tokens.append(int(seen.sum()))
        vision_tokens.append(int((seen & vision).sum()))
    return prefill_flops(model.config, tokens, vision_tokens)
