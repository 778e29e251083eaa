"""Attention statistics and token-selection kernels.

Each public function dispatches to a Triton kernel for CUDA tensors (when Triton is importable) and to its plain-torch reference elsewhere; the three variants
(dispatcher, ``*_reference``, ``*_triton``) share one signature (``attention_stats``'s ``key_mask`` /
``causal`` exist in the reference only: the dispatcher sends such calls there). Triton is imported lazily, only when
a Triton path runs, so importing this package works without Triton (e.g. on macOS). The ``*_triton``
functions also run on CPU tensors when Triton was imported with ``TRITON_INTERPRET=1``.

Host syncs: none on the Triton paths of ``attention_stats`` (index lists / CPU tensors given as
``query_index`` or ``segments`` are validated on the host and their device copies cached by content;
indices already on the GPU are checked with ``torch._assert_async``) and ``transition_variation``;
``topk_gather`` syncs once when ``k`` is a per-row tensor (to size its output).

``segmented_attention`` (attention inside the ``cu_seqlens`` segments of one packed sequence) is
the exception to "Triton on CUDA": its fast path is compiled FlexAttention (which generates Triton),
beside the same kind of plain-torch reference; no host sync on CUDA either.
"""

from __future__ import annotations

from ._triton_support import interpret_mode, triton_importable, use_triton
from .attention_stats import attention_stats, attention_stats_reference, attention_stats_triton
from .segmented_attention import (
    segmented_attention,
    segmented_attention_flex,
    segmented_attention_reference,
)
from .topk_gather import topk_gather, topk_gather_reference, topk_gather_triton
from .transition_variation import (
    transition_variation,
    transition_variation_reference,
    transition_variation_triton,
)

__all__ = [
    "attention_stats",
    "attention_stats_reference",
    "attention_stats_triton",
    "interpret_mode",
    "segmented_attention",
    "segmented_attention_flex",
    "segmented_attention_reference",
    "topk_gather",
    "topk_gather_reference",
    "topk_gather_triton",
    "transition_variation",
    "transition_variation_reference",
    "transition_variation_triton",
    "triton_importable",
    "use_triton",
]
