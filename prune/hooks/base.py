"""The adapter interface and the flow every adapter shares.

An adapter names a family's modules and tells where each image's (or video's) tokens sit and
which encoder statistics belong to them; everything else (signal collection, budgets, selection,
the cut, decoding) is done here, the same for all families.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn
from transformers.masking_utils import create_masks_for_generate

from .._compat import cache_length, cache_parameter, find_cache, is_static_cache
from ..kernels import attention_stats
from ..kernels.attention_stats import segment_bounds
from ..methods import EncoderInfo, Method, SignalRequest
from ..methods.base import BatchSelection, ViewBatch, _pad_rows, to_device
from ..state import ImageRecord, PruneRecord, PruneState
from . import vision_attention
from .attention_tap import install_tap
from .cutter import (
    Packing,
    cached_call,
    cut_prefill,
    map_decode,
    map_decode_static,
    plain_causal_text,
    static_mask,
    two_d_mask,
)


@dataclass
class ImageLayout:
    """Where one image's (or video's) placeholder tokens come from.

    grids: (h, w) of every view (base image, crops, frames); patch p of a view sits at (p // w, p % w).
    token_view: (n,) long, the view each placeholder token comes from, in token order; -1 for tokens
        that are never pruned (e.g. LLaVA-NeXT's image_newline).
    token_patch: (n,) long, the patch index inside its view (-1 where token_view is -1).
    signals: per view, SignalRequest.key -> (h*w,) fp32 score of each patch.
    split: how the image's budget spreads over its views: "even" or "proportional" to the views'
        token counts (a method's ``views`` option can replace both with its reference's budgeting).
    """

    grids: list[tuple[int, int]]
    token_view: torch.Tensor
    token_patch: torch.Tensor
    signals: list[dict[str, torch.Tensor]]
    split: str = "even"

    @property
    def num_tokens(self) -> int:
        return int(self.token_view.numel())


def split_budget(total: int, caps: list[int], proportional: bool = False) -> list[int]:
    """Split ``total`` over views, never above a view's cap.

    even: equal shares (earlier views take the remainder); what a full view cannot take goes to the
    others. proportional: shares by cap (largest remainders take the rounding).
    """
    total = min(total, sum(caps))
    if proportional and sum(caps) > 0:
        exact = [total * c / sum(caps) for c in caps]
        shares = [int(x) for x in exact]
        order = sorted(range(len(caps)), key=lambda i: (shares[i] - exact[i], i))
        for i in order[: total - sum(shares)]:
            shares[i] += 1
        return shares
    shares = [0] * len(caps)
    remaining = total
    while remaining > 0:
        open_views = [i for i, c in enumerate(caps) if shares[i] < c]
        each, extra = divmod(remaining, len(open_views))
        for rank, i in enumerate(open_views):
            add = min(caps[i] - shares[i], each + (1 if rank < extra else 0))
            shares[i] += add
            remaining -= add
    return shares


def _padding(kwargs: dict[str, Any], like: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: padding positions of the language model's input."""
    mask = two_d_mask(kwargs.get("attention_mask"), like.shape[1])
    if mask is None:
        return torch.zeros_like(like)
    return ~mask.bool()


@functools.lru_cache(maxsize=256)
def _parameter_names(fn) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def bind_arguments(fn, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Positional and keyword arguments of a call to ``fn`` as one dict (defaults not filled)."""
    if not args:
        return dict(kwargs)
    # the function behind a bound method (a new object at every attribute access) keys the cache
    names = _parameter_names(getattr(fn, "__func__", fn))
    if hasattr(fn, "__func__"):
        names = names[1:]  # drop self
    return {**dict(zip(names, args)), **kwargs}


class Adapter:
    """Base class: one subclass per model family (one file each in ``prune/hooks/``)."""

    family: ClassVar[str] = ""
    model_classes: ClassVar[tuple[str, ...]] = ()
    #: modality -> method of the multimodal module that runs the vision encoder for it
    feature_functions: ClassVar[dict[str, str]] = {"image": "get_image_features"}
    #: position modes this family supports
    position_modes: ClassVar[tuple[str, ...]] = ("original", "compact")
    #: the vision encoder attends over segments (windows, images, frames) of one packed sequence and
    #: its attention takes cu_seqlens: ``vision_attention="segmented"`` applies (vision_attention.py)
    segmented_vision: ClassVar[bool] = False
    #: the selection runs as soon as a prefill's media and prompt are both known (the end of the
    #: feature function, or the multimodal forward's pre-hook when ``generate`` encoded the media
    #: first), while the GPU still works through the encoder, rather than at the language model's
    #: call, after transformers' placeholder check has drained the GPU queue (see
    #: :meth:`Adapter._select_early`); False for a family whose selection needs more of the call
    early_selection: ClassVar[bool] = True
    #: decode steps on a static cache in the fixed-shape form (see cutter.map_decode_static); False
    #: for a family that rebuilds the step's masks itself from the 2-D mask (Gemma 3)
    static_decode: ClassVar[bool] = True

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    # ---- what a family must say -------------------------------------------------------------
    def multimodal_module(self) -> nn.Module:
        """The module whose forward receives input_ids / pixel_values and calls the language model."""
        raise NotImplementedError

    def language_model(self) -> nn.Module:
        raise NotImplementedError

    def vision_attention_modules(self) -> list[nn.Module]:
        """The attention module of every vision-encoder layer, in order."""
        raise NotImplementedError

    def encoder_info(self) -> EncoderInfo:
        raise NotImplementedError

    def patch_offset(self) -> int:
        """Column of patch 0 in an encoder row (1 when a [CLS] token leads; none by default)."""
        return 0

    def vision_readout_layers(self) -> list[int]:
        """Vision-encoder layers whose output is read outside the layer loop besides the last one
        (Qwen3-VL's DeepStack blocks); encoder-stage pruning gives them their full-length output."""
        return []

    def placeholder_id(self, modality: str) -> int:
        """The token id that stands for one vision token of ``modality`` in input_ids."""
        raise NotImplementedError

    def layouts(self, modality: str, args: dict[str, Any], signals: dict[str, torch.Tensor]) -> list[ImageLayout]:
        """Layouts of the images (videos) that one call of the modality's feature function encoded,
        in the order their tokens appear in the batch. ``args`` are that call's arguments, ``signals``
        the statistics collected while it ran (SignalRequest.key -> tensor, chunks concatenated on
        the last dimension)."""
        raise NotImplementedError

    def cut_sequence_arguments(
        self, kwargs: dict[str, Any], new_kwargs: dict[str, Any], keep_mask: torch.Tensor
    ) -> dict[str, Any]:
        """Gather the family's own sequence-indexed language-model arguments (e.g. DeepStack's visual
        mask and features, Gemma 3's token_type_ids) with the kept rows of ``keep_mask`` (B, L), packed
        as ``cutter.Packing.of(keep_mask)`` packs them. ``kwargs``: the uncut call; ``new_kwargs``: the
        cut one to return (default: unchanged)."""
        return new_kwargs

    # ---- shared flow ------------------------------------------------------------------------
    def install(self, state: PruneState, method: Method) -> None:
        from . import encoder_stage

        requests = method.bind(self.encoder_info())
        encoder_stage.check_encoder_stage(self, method)
        self.state, self.method = state, method
        if state.vision_attention == "segmented":  # before any tap: a tap goes over this view
            state._removers.extend(vision_attention.install(self.vision_attention_modules()))
        self.decoder_cut = None
        if getattr(method, "in_llm", False):
            from .decoder_cut import DecoderCut

            self.decoder_cut = DecoderCut(self, method, state)
            self.decoder_cut.install()
            if callable(getattr(self.model, "generate", None)):  # marks a generate call's decode steps
                state._removers.append(_GenerateTurn(self, self.model).install())
            mm = self.multimodal_module()
            lm = self.language_model()
            h1 = mm.register_forward_pre_hook(self._on_multimodal_call, with_kwargs=True)
            h2 = lm.register_forward_pre_hook(self._on_language_model_call, with_kwargs=True)
            h3 = lm.register_forward_hook(self._after_language_model)
            state._removers.extend([h1.remove, h2.remove, h3.remove, *self._host_helpers(mm)])
            return
        by_layer: dict[int, list[SignalRequest]] = {}
        for req in requests:
            by_layer.setdefault(req.layer, []).append(req)
        attn = self.vision_attention_modules()
        keep_all = isinstance(state.config.keep, float) and state.config.keep >= 1.0
        for layer, reqs in by_layer.items():
            if keep_all:
                break  # keep=1.0 keeps every token: no statistic is needed
            state._removers.append(install_tap(attn[layer], self._tap_callback(reqs)))
        mm = self.multimodal_module()
        for modality, name in self.feature_functions.items():
            state._removers.append(self._wrap_feature_function(mm, modality, name))
        state._removers.extend(self._host_helpers(mm))
        if callable(getattr(self.model, "generate", None)):
            state._removers.append(_GenerateTurn(self, self.model).install())
        h1 = mm.register_forward_pre_hook(self._on_multimodal_call, with_kwargs=True)
        h2 = self.language_model().register_forward_pre_hook(self._on_language_model_call, with_kwargs=True)
        state._removers.extend([h1.remove, h2.remove])
        if encoder_stage.stage_of(method) == "encoder" and not keep_all:
            self.method = encoder_stage.install(self, state, method)  # rows drop inside the encoder

    def _wrap_feature_function(self, mm: nn.Module, modality: str, name: str):
        """Run the vision encoder under collection. transformers >= 5.2x's ``generate`` encodes the
        media before the prefill forward; older versions do it inside the forward: either way the call
        is recorded here and consumed by the next prefill of the language model."""
        return _FeatureFunction(self, mm, modality, name).install()

    def _run_feature_function(self, original, modality: str, args, kwargs):
        state = self.state
        if state._collecting is not None:  # called by another feature function (Qwen3-VL: video -> image)
            return original(*args, **kwargs)
        # the layouts read the shape arguments (image_sizes, grid_thw, ...) on the host: copied now,
        # before the encoder is queued, where a read costs no waiting (the model reads them too)
        bound = bind_arguments(original, args, kwargs)
        shape_arguments = host_shape_arguments(bound)
        self._keep_host_copies((bound[name], shape_arguments[name]) for name in bound)
        collected: dict[str, list[torch.Tensor]] = {}
        state._collecting = collected
        try:
            out = original(*args, **kwargs)
        finally:
            state._collecting = None
        signals = joined_signals(collected)
        state._media[modality] = (shape_arguments, signals)
        # generate(use_cache=False) passes these same encoder outputs to every step's prefill
        state._encoded[modality] = (out, state._media[modality])
        self._select_early(modality)  # a forward's own encoder call: its prompt is known already
        return out

    #: the multimodal module's helpers that read their tensor arguments' values on the host (run on
    #: prune's host copies, see :meth:`_host_call`), and whether every argument after the prompt's ids
    #: is read for its shape only
    host_helpers: ClassVar[dict[str, bool]] = {"get_placeholder_mask": True}

    def _host_helpers(self, mm: nn.Module) -> list:
        """Install :meth:`_host_call` over each of ``host_helpers`` the multimodal module has; the removers."""
        return [_OnHost(self, mm, name, shape_only).install() for name, shape_only in self.host_helpers.items()
                if callable(getattr(mm, name, None))]

    def _host_call(self, original, args, kwargs, shape_only: bool):
        """A model helper that reads the values of its tensor arguments, run on host copies of them
        made before the encoder was queued (the prompt's ids, mask and other per-token integer
        tensors in :meth:`_prompt_on_host`; the feature functions' shape arguments), its tensor results
        copied to the device from pinned memory. transformers' placeholder check (counts the
        placeholders on the device, formats the count into its error message, checks it) and Qwen's
        rotary index (a loop over the prompts that reads ids, types and grids) read back on the
        device: each read waits for the vision encoder to finish, after which the GPU idles while the
        host queues the rest of the prefill. The first argument must be this call's ids; with
        ``shape_only`` the others go in as stand-ins of their shape (the placeholder check reads the
        embeddings' device and width and the features' sizes; its masks go to the embeddings' device,
        as the model's own do), otherwise every device tensor argument needs a host copy (the results
        go to the ids' device). Any other call (another prompt, a device argument with no copy, inside
        ``torch.compile``) runs the model's own."""
        call = self.state._call
        fn = getattr(original, "__func__", None)
        if not call or fn is None or torch.compiler.is_compiling():
            return original(*args, **kwargs)
        names = _parameter_names(fn)[1:]  # after self
        bound = bind_arguments(original, args, kwargs)
        ids = bound.get(names[0]) if names else None
        if ids is None or ids is not call.get("input_ids"):
            return original(*args, **kwargs)
        on_host = dict(bound)
        for name, value in bound.items():
            if not isinstance(value, torch.Tensor):
                continue
            if shape_only and name != names[0]:
                on_host[name] = torch.zeros((), dtype=value.dtype).expand(value.shape)  # sizes only
                continue
            host = self._host_copy(value)
            if host is None and value.device.type != "cpu":
                return original(*args, **kwargs)
            on_host[name] = value if host is None else host
        out = original(**on_host)  # the model's own errors (features that do not fit) raise here
        embeds = bound.get(names[1]) if shape_only and len(names) > 1 else None  # the second parameter
        device = embeds.device if isinstance(embeds, torch.Tensor) else ids.device
        if isinstance(out, torch.Tensor):
            return _host_result_on(out, device)
        return type(out)(_host_result_on(t, device) if isinstance(t, torch.Tensor) else t for t in out)

    def _host_copy(self, value: torch.Tensor) -> torch.Tensor | None:
        """The host copy of a device tensor made before the encoder was queued, if there is one."""
        call = self.state._call
        if value is call.get("input_ids"):
            return call.get("host:ids")
        if value is call.get("host:mask"):
            return call.get("host:mask_values")
        entry = self.state._scratch.get("host_copies", {}).get(id(value))
        return entry[2] if entry is not None and entry[0] is value and entry[1] == value._version else None

    def _keep_host_copies(self, pairs) -> None:
        """Note (device tensor, its host copy) pairs for :meth:`_host_copy` (keyed by identity and
        version: an entry is right for as long as it can be found)."""
        copies = self.state._scratch.setdefault("host_copies", {})
        if len(copies) > 64:  # a long stream of calls: start over
            copies.clear()
        for value, host in pairs:
            if isinstance(value, torch.Tensor) and host is not value:
                copies[id(value)] = (value, value._version, host)

    def _select_at_encoder_cut(self, modality: str, shape_arguments: dict[str, Any]) -> None:
        """Encoder-stage pruning: every statistic the selection reads is collected once the cut layer
        has run (the method reads no later layer), so the language model's selection is made there,
        while the host is still ahead of the GPU (a Qwen encoder then synchronises at its merger, so
        the end of the feature function is already past the GPU's idle point). The feature function's
        end adopts it (see :meth:`_select_early`)."""
        collected = self.state._collecting
        if collected is None:
            return
        self._select_early(modality, (shape_arguments, joined_signals(collected)), provisional=True)

    def _select_early(self, modality: str, media: tuple | None = None, provisional: bool = False) -> None:
        """Run the selection of ``modality`` for the current prefill now, if its prompt and media are
        both known: the host queues it while the GPU still runs the encoder. At the language model's
        call (after transformers' placeholder check, which reads a count back and so drains the GPU
        queue) only the cut is left to queue, so the GPU idles for less host work. The language-model
        hook uses this result when it was made for the same call, media and sequence shape, and
        otherwise selects as before; a method that reads the language model's input embeddings
        (``needs_features``) always selects there. Nothing here reads the device."""
        state = self.state
        call = state._call
        media = state._media.get(modality) if media is None else media
        if (not self.early_selection or self.decoder_cut is not None or not call or media is None
                or call.get(f"host:{modality}") is None or self.method.needs_features):
            return
        basis = call.get("input_ids")
        basis = call.get("inputs_embeds") if basis is None else basis
        if not isinstance(basis, torch.Tensor) or basis.ndim < 2:
            return
        early = state._scratch.setdefault("early_selection", {})
        done = early.get(modality)
        if done is not None and done.call is call:
            if done.media is media:
                return
            if done.provisional and not provisional:  # made at the encoder-stage cut on this call's statistics
                early[modality] = done._replace(media=media, provisional=False)
                return
        batch, length = basis.shape[:2]
        stand_in = torch.empty(batch, length, 0, device=basis.device)  # only its shape and device are read
        keep_mask = torch.ones(batch, length, dtype=torch.bool, device=basis.device)
        records: list[ImageRecord] = []
        try:
            out = self._select(modality, call, media[0], media[1], stand_in, keep_mask, records)
        except Exception:  # noqa: BLE001 - the language-model hook selects again and reports it there
            early.pop(modality, None)
            return
        if out is stand_in:
            early[modality] = _EarlySelection(call, media, keep_mask, records, provisional)

    def _tap_callback(self, requests: list[SignalRequest]):
        return functools.partial(self._collect, requests)  # a partial, not a closure: copies and pickles follow

    def _collect(self, requests: list[SignalRequest], module, q, k, attention_mask, kwargs):
        collected = self.state._collecting
        if collected is None:
            return
        # FlashAttention gets all windows in one call with cu_seqlens; other backends one call each.
        segments = kwargs.get("cu_seq_lens_q")
        for req in requests:
            query_index = [0] if req.query == "cls" else None  # host indices: no device sync
            stats = attention_stats(
                q.detach(), k.detach(), query_index=query_index, segments=segments, scale=kwargs.get("scaling")
            )  # (batch, N) fp32
            if req.query == "sum":  # every row of this call was averaged: back to the sum over rows
                stats = stats * q.shape[2]
            elif req.query == "all" and segments is not None:
                # one call over all segments averaged over all its rows; the per-segment calls the
                # other backends make average over each segment's own rows: the same scale for both
                lo, hi = segment_bounds(torch.as_tensor(segments).to(stats.device, torch.int64), q.shape[2])
                stats = stats * (q.shape[2] / (hi - lo).float())
            collected.setdefault(req.key, []).append(stats)

    def _on_multimodal_call(self, module, args, kwargs):
        if args:  # some families pass input_ids positionally
            kwargs = bind_arguments(module.forward, args, kwargs)
        cache = find_cache(kwargs)
        if self._past(cache)[0]:
            # a decode step, or a later turn on a cache a pruned prefill produced: the language-model
            # hook maps it; media in the uncached part of a later turn cannot be placed on that cache
            if self._plan_for(cache) is not None:
                if any(kwargs.get(name) is not None for name in self._media_arguments(module)):
                    self.state._media = {"media": None}  # the encoder will run inside this forward
                self._refuse_new_media()
            return None
        self.state._call = {"input_ids": kwargs.get("input_ids"), "inputs_embeds": kwargs.get("inputs_embeds")}
        self.state._call.update(self._prompt_on_host(kwargs))
        self._keep_host_copies(self.state._call.get("host:extra", ()))
        for modality, output in (kwargs.get("mm_encoder_outputs") or {}).items():
            cached = self.state._encoded.get(modality)
            if modality not in self.state._media and cached is not None and cached[0] is output:
                self.state._media[modality] = cached[1]  # a re-used encoder output (no KV cache)
        for modality in list(self.state._media):  # media encoded before this forward (generate)
            if modality in self.feature_functions:
                self._select_early(modality)
        return None

    def later_turn_arguments(self, kwargs: dict[str, Any], physical: int, logical: int) -> dict[str, Any]:
        """``generate`` arguments of a later turn on a pruned cache that holds ``physical`` rows for the
        history's first ``logical`` tokens. Families whose ``generate`` reads per-token arguments at the
        cache's length (Qwen: which uncached tokens are media) override this; the default changes nothing."""
        return kwargs

    def _prompt_on_host(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Host copies of what the selection needs from the prompt: each modality's (B, L) placeholder
        mask (``host:<modality>``), the ids (``host:ids``), each row's real (non-padding) token count
        (``host:real``), the 2-D mask it was read from (``host:mask``) and its values
        (``host:mask_values``). One device read, made where
        the GPU queue is short: in the multimodal forward's pre-hook, before the encoder runs inside it,
        or (generate, which encodes the media first) by :class:`_GenerateTurn` before generating."""
        ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
        ref = kwargs.get("attention_mask")
        mask = ref if isinstance(ref, torch.Tensor) and ref.ndim == 2 else None
        key = _prompt_key(ids if ids is not None else embeds, mask)
        early = self.state._scratch.get("prompt_on_host")
        if early is not None and early[0] == key:
            return early[1]
        return read_prompt(self, ids, embeds, mask, kwargs)

    def _host_placeholder_mask(self, modality: str, call: dict[str, Any]) -> torch.Tensor:
        """(B, L) bool on the host: the modality's placeholders (read once per call, see
        :meth:`_prompt_on_host`; a call that did not pass through it is read now)."""
        host = call.get(f"host:{modality}")
        return host if host is not None else self._placeholder_mask(modality, call).cpu()

    def _take_cached_prefix(self, cache) -> int:
        """Leading tokens of this call's input that the pruned cache already holds logically: a later
        turn's ``generate`` (history + new tokens) keeps the tokens past the cache's *physical* length,
        which pruning made shorter (set by :class:`_GenerateTurn`, consumed by the first forward)."""
        pending = self.state._scratch.pop("cached_prefix", None)
        if pending is None or pending[0] is not cache:
            return 0
        return pending[1]

    def _media_arguments(self, module: nn.Module) -> list[str]:
        """The forward's media arguments: the first parameter of each feature function (by signature;
        read once per module class: every decode step asks)."""
        names = self._media_argument_names.get(type(module))
        if names is None:
            names = []
            for name in self.feature_functions.values():
                fn = getattr(type(module), name, None)
                params = list(inspect.signature(fn).parameters)[1:] if fn is not None else []
                if params:
                    names.append(params[0])
            self._media_argument_names[type(module)] = names
        return names

    @functools.cached_property
    def _media_argument_names(self) -> dict[type, list[str]]:
        return {}

    @functools.cached_property
    def _plain_causal(self) -> bool:
        """The language model attends causally over its whole cache in every layer (read once: a
        wrap does not change the config's layout)."""
        return plain_causal_text(self.model.config)

    def _refuse_new_media(self) -> None:
        """A later turn on a pruned cache whose call ran the vision encoder (new media) cannot be placed."""
        if self.state._media:
            modalities = ", ".join(sorted(self.state._media))
            self.state._media = {}
            try:  # the keyword this release gives the cache (5.24: past_key_values -> cache)
                name = cache_parameter(type(self.model).forward)
            except TypeError:
                name = "cache"
            raise ValueError(
                f"{name}: this call passes new media ({modalities}) with a cache that a pruned "
                "prefill produced; prune cannot place new media on a pruned cache. Pass the whole history "
                f"with all its media and no {name} (the prompt is pruned afresh), or unwrap the model."
            )

    def _placeholder_mask(self, modality: str, call: dict[str, Any]) -> torch.Tensor:
        token = self.placeholder_id(modality)
        input_ids = call.get("input_ids")
        if input_ids is not None:
            return input_ids == token
        # Same rule as transformers: placeholders are rows equal to the token's embedding.
        embeds = call["inputs_embeds"]
        ref = self.model.get_input_embeddings()(torch.tensor(token, device=embeds.device))
        return (embeds == ref).all(-1)

    def _past(self, cache) -> tuple[bool, Any]:
        """(whether the cache holds tokens, how many). In the later forwards of a ``generate`` call on a
        static cache the answer is known without reading the device: its first forward filled the cache,
        and the count is the cache's own 0-d length tensor (so a compiled decode step syncs nothing)."""
        if self._decoding(cache) is not None:
            return True, cache.get_seq_length()
        past_len = cache_length(cache)
        return past_len > 0, past_len

    def _decoding(self, cache) -> tuple | None:
        """(cache, plan, in-LLM context) of the generate call in progress once its first forward ran on
        the static cache ``cache`` (None otherwise). Its later forwards read the plan here rather than
        in the weak map of plans: a compiled model call (``generate``'s own compile traces the hooks)
        then sees the same few objects every step and every call."""
        entry = self.state._scratch.get("decoding")
        return entry if entry is not None and cache is not None and entry[0] is cache else None

    def _plan_for(self, cache):
        entry = self._decoding(cache)
        return entry[1] if entry is not None else self.state.plan_for(cache)

    def _on_language_model_call(self, module, args, kwargs):
        cache = find_cache(kwargs)
        try:
            return self._language_model_call(args, kwargs, cache)
        finally:
            scratch = self.state._scratch
            if scratch.get("generating") and "decoding" not in scratch and is_static_cache(cache):
                # the next forwards of this generate call are decode steps on what this one left
                cut = self.decoder_cut
                scratch["decoding"] = (cache, self.state.plan_for(cache), cut.context if cut is not None else None)

    def _language_model_call(self, args, kwargs, cache):
        state = self.state
        if kwargs.get("inputs_embeds") is None:
            return None
        decoding, past_len = self._past(cache)
        if self.decoder_cut is not None:
            return self._start_llm_call(kwargs, cache, past_len, decoding)
        if decoding:
            plan = self._plan_for(cache)
            if plan is None:
                return None
            self._refuse_new_media()  # older transformers run the encoder inside the forward
            drop = self._take_cached_prefix(cache)
            if self.static_decode and is_static_cache(cache):  # fixed shapes in physical columns: one graph
                build = getattr(self.model, "create_masks_for_generate", None) or create_masks_for_generate
                return args, map_decode_static(kwargs, plan, cache, past_len, build, self.model.config, drop=drop,
                                               plain_causal=self._plain_causal)
            return args, map_decode(kwargs, plan, past_len, drop=drop)
        call, media = state._call, state._media
        state._call, state._media = {}, {}
        state._scratch.pop("host_copies", None)  # their helpers ran before the language model
        early = state._scratch.pop("early_selection", None) or {}
        state.set_plan(cache, None)
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        keep_mask = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        records: list[ImageRecord] = []
        if call:
            for modality in self.feature_functions:
                if modality in media:
                    done = early.get(modality)
                    if (done is not None and done.call is call and done.media is media[modality]
                            and done.keep_mask.shape == keep_mask.shape and done.keep_mask.device == keep_mask.device):
                        keep_mask &= done.keep_mask  # selected while the encoder ran (see _select_early)
                        records.extend(done.records)
                        continue
                    fn_args, signals = media[modality]
                    embeds = self._select(modality, call, fn_args, signals, embeds, keep_mask, records)
                elif bool(self._host_placeholder_mask(modality, call).any()):
                    warnings.warn(
                        f"the prompt holds {modality} tokens but the vision encoder did not run under prune "
                        "(pre-computed features?): they are not pruned",
                        stacklevel=2,
                    )
        padding = _padding(kwargs, keep_mask)
        counts = self._kept_counts(call, kwargs, records, batch, length)
        untouched = bool(keep_mask.all()) if counts is None else all(r.kept_count == r.tokens_before for r in records)
        if untouched:
            # no media, or nothing removed (keep=1.0): the model runs untouched
            state.last = PruneRecord(keep_mask=keep_mask, images=records, positions=state.positions, padding=padding)
            return None
        kwargs = dict(kwargs, inputs_embeds=embeds)
        new_kwargs, plan, positions = cut_prefill(kwargs, keep_mask, state.positions, counts)
        # the rows the cut packed (padding is never kept)
        self.state._scratch["cut_counts"] = counts
        self.state._scratch["cut_removed"] = None if counts is None else sum(r.tokens_before - r.kept_count
                                                                              for r in records)
        new_kwargs = self.cut_sequence_arguments(kwargs, new_kwargs, keep_mask & ~padding.to(keep_mask.device))
        state.set_plan(cache, plan)
        if is_static_cache(cache):  # its decode mask, built before any decode step (which may be compiled)
            static_mask(plan, int(cache.get_max_length()))
        state.last = PruneRecord(
            keep_mask=keep_mask, images=records, positions=state.positions, position_ids=positions, padding=padding
        )
        return args, new_kwargs

    def _kept_counts(self, call, kwargs, records, batch: int, length: int) -> list[int] | None:
        """Real tokens each row keeps, from the host copy of the prompt and the records' host counts
        (no device read); None where either is unknown (the cut then reads them back)."""
        if any(r.kept_count is None for r in records):
            return None
        mask = two_d_mask(kwargs.get("attention_mask"), length)
        ref = call.get("host:mask")
        if mask is None:
            real = [length] * batch
        elif ref is not None and _same_tensor(mask, ref) and call.get("host:real") is not None:
            real = call["host:real"].tolist()
        else:
            return None
        for r in records:
            real[r.sample] -= r.tokens_before - r.kept_count
        return real

    def packing(self, keep_mask: torch.Tensor) -> Packing:
        """:meth:`Packing.of` for ``cut_sequence_arguments``: with the host counts of this call's cut
        when the cut had them (no device read)."""
        return Packing.of(keep_mask, self.state._scratch.get("cut_counts"))

    # ---- in-LLM methods: the language model's input is untouched; decoder layers cut ---------------
    def _start_llm_call(self, kwargs, cache, past_len, decoding: bool):
        state, cut = self.state, self.decoder_cut
        if decoding:
            entry = self._decoding(cache)
            cut.start_decode(kwargs, cache, past_len, *([entry[2]] if entry is not None else []))
            return None
        call = state._call
        state._call = {}
        state._scratch.pop("host_copies", None)  # their helpers ran before the language model
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        vision = torch.zeros(batch, length, dtype=torch.bool, device=embeds.device)
        records = []
        found = 0
        host = None  # (placeholders, padding mask) of the prompt on the host, when it was read
        if call:
            masks = [(modality, self._placeholder_mask(modality, call).to(embeds.device))
                     for modality in self.feature_functions]
            on_host = [call.get(f"host:{modality}") for modality in self.feature_functions]
            padding = self._host_mask_values(call, kwargs, batch, length)
            if masks and padding is not None and all(m is not None and m.shape == (batch, length) for m in on_host):
                counts = [m.sum(1).tolist() for m in on_host]
                host = (functools.reduce(torch.logical_or, on_host), padding)
            else:  # one read for every modality and prompt: how many placeholders each holds
                counts = torch.stack([m.sum(1) for _, m in masks]).tolist() if masks else []
            for (modality, placeholders), row_counts in zip(masks, counts):
                vision |= placeholders
                for b, n in enumerate(row_counts):
                    if n:
                        pos = torch.nonzero_static(placeholders[b], size=n)[:, 0]
                        records.append(ImageRecord(sample=b, positions=pos, kept=torch.ones_like(pos, dtype=torch.bool),
                                                   scores={}, budget=n, grids=[], modality=modality))
                        found += n
        keep_mask = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        state.last = PruneRecord(
            keep_mask=keep_mask, images=records, positions=state.positions, padding=_padding(kwargs, keep_mask)
        )
        if not found:
            cut.context = None
            return None
        cut.start_prefill(kwargs, cache, vision, host)
        if host is not None and bool(host[1].all()) and cached_call(kwargs):
            return (), dict(kwargs, attention_mask=None)  # all ones: as a prompt given none (see cut_prefill)
        return None

    @staticmethod
    def _host_mask_values(call, kwargs, batch: int, length: int) -> torch.Tensor | None:
        """(B, L) host copy of the language model's 2-D padding mask: ones when it is given none, the
        prompt's host copy when it is the mask that was read; None otherwise (a mask made since)."""
        mask = kwargs.get("attention_mask")
        if mask is None:
            return torch.ones(batch, length, dtype=torch.long)
        ref = call.get("host:mask")
        if isinstance(mask, torch.Tensor) and ref is not None and _same_tensor(mask, ref):
            return call.get("host:mask_values")
        return None

    def _after_language_model(self, module, args, output):
        cut, last = self.decoder_cut, self.state._local.last
        ctx = cut.context
        if ctx is None or ctx.phase != "prefill" or last is None:
            return None
        last.layer_masks = cut.seen_masks()
        final = last.layer_masks[-1][1]
        for im in last.images:
            im.kept = final[im.sample, im.positions]
        ctx.phase = "decode"
        if is_static_cache(ctx.cache):
            cut.static_masks(ctx)  # built before any decode step (which may be compiled)
        return None

    def _select_expanded(self, copies, select, call, embeds, keep_mask, records):
        """Run ``select(call, embeds, keep_mask, records)`` once per prompt of an expanded batch; every
        copy of a prompt gets its kept set (and its merged rows)."""
        batch = keep_mask.shape[0]
        first = {key: value[::copies] if isinstance(value, torch.Tensor) and value.shape[:1] == (batch,) else value
                 for key, value in call.items()}
        sub_keep, sub_records = keep_mask[::copies].clone(), []
        sub_embeds = embeds[::copies]
        out = select(first, sub_embeds, sub_keep, sub_records)
        keep_mask.copy_(sub_keep.repeat_interleave(copies, 0))
        for record in sub_records:
            records.extend(dataclasses.replace(record, sample=record.sample * copies + j) for j in range(copies))
        return embeds if out is sub_embeds else out.repeat_interleave(copies, 0)

    def _select(self, modality, call, fn_args, signals, embeds, keep_mask, records):
        """Run the method on every view of one modality; fill ``keep_mask`` and ``records`` in place.
        Returns the (possibly merged) embeddings.

        Host arithmetic on shapes (the layouts, budgets, where each token sits, read off the host copy
        of the prompt) plans the call; the method ranks every view of it at once on the device
        (:meth:`Method.select_batch`), and its answer is scattered into ``keep_mask`` with indices
        copied from pinned memory: nothing is read back from the device."""
        signals = {key: stats.detach().float() for key, stats in signals.items()}
        try:
            layouts = self.layouts(modality, fn_args, signals)
        except Expanded as expanded:  # an adapter that reads layouts off the prompt found copies
            def select_first(c, e, k, r):
                return self._select(modality, c, fn_args, signals, e, k, r)

            return self._select_expanded(expanded.copies, select_first, call, embeds, keep_mask, records)
        host_mask = self._host_placeholder_mask(modality, call)
        rows, cols = host_mask.nonzero(as_tuple=True)  # scatter order
        expected = sum(lay.num_tokens for lay in layouts)
        if rows.numel() == 0:
            return embeds  # the encoder ran for another call (e.g. get_image_features called directly)
        if rows.numel() != expected:
            host_call = {"input_ids": call.get("host:ids")} if call.get("host:ids") is not None else call
            copies = expansion(rows.numel(), expected, host_call, keep_mask.shape[0])
            if copies:
                def select(c, e, k, r):
                    return self._select(modality, c, fn_args, signals, e, k, r)

                return self._select_expanded(copies, select, call, embeds, keep_mask, records)
            raise RuntimeError(f"found {rows.numel()} {modality} placeholder tokens but the inputs give {expected}")
        device = embeds.device
        plan = self._call_plan(modality, layouts, host_mask, rows, cols, device)
        # ---- rank every view of the call at once, on the device ----------------------------------
        sel = features = None
        counts = list(plan.base_counts)
        if plan.ranked and self.method.needs_features:  # (V, P, D) the views' embeddings, zeros elsewhere
            features = _view_features(embeds, plan.at_rows, plan.at_cols, plan.src, len(plan.ranked) * plan.width)
            features = features.view(len(plan.ranked), plan.width, embeds.shape[-1])
        if plan.ranked:
            sel = plan.host_selection or rank_views(self.method, layouts, plan.ranked, plan.valid, device, features)
            for (i, _, _), count in zip(plan.ranked, sel.counts or [None] * len(plan.ranked)):
                if counts[i] is not None:
                    counts[i] = None if count is None else counts[i] + count
        # ---- scatter the answer into the keep-mask ---------------------------------------------
        kept, score = plan.kept, plan.score
        if sel is not None:
            kept = torch.where(plan.ranked_token, sel.keep.flatten()[plan.src_clamped], kept)
            if sel.score is not None:
                score = torch.where(plan.ranked_token, sel.score.flatten().float()[plan.src_clamped], score)
            if sel.assign is not None:
                embeds = _merge_batch(embeds, plan.at_rows, plan.at_cols, plan.src, sel.assign, features)
        keep_mask[plan.at_rows, plan.at_cols] = kept
        for p, part, positions, count in zip(plan.plans, plan.parts, plan.positions, counts):
            merged = None
            if self.method.needs_features:
                if count is None:
                    where = kept[part].nonzero().view(-1)
                else:  # the kept rows in token order, sized from the host count
                    where = torch.nonzero_static(kept[part], size=count).view(-1)
                merged = embeds[p.sample, positions[where]].detach()
            records.append(
                ImageRecord(
                    sample=p.sample,
                    positions=positions,
                    kept=kept[part],
                    scores={"score": score[part]},
                    budget=p.budget,
                    grids=list(p.layout.grids),
                    modality=modality,
                    merged=merged,
                    token_view=p.token_view,
                    token_patch=p.token_patch,
                    view_budgets=list(p.shares),
                    kept_count=count,
                )
            )
        return embeds

    def _call_plan(self, modality: str, layouts: list[ImageLayout], host_mask: torch.Tensor, rows: torch.Tensor,
                   cols: torch.Tensor, device: torch.device) -> _CallPlan:
        """The host's plan of one selection call (budgets, which views need ranking, where every token
        sits, those indices on the device), kept per call structure: a call of the same layouts and
        the same placeholder positions (every call of a batch of equal images and prompts, every
        rerun) reuses it and copies nothing. The plan depends on shapes only, never on the signals."""
        key = _plan_key(modality, layouts, host_mask, device)
        plans_cache = self.state._selection_plans
        found = plans_cache.get(key)
        if found is not None:
            return found
        config = self.state.config
        plans: list[_Planned] = []
        ranked: list[tuple[int, int, torch.Tensor, int]] = []  # (plan, view, its tokens, budget)
        start = 0
        for i, lay in enumerate(layouts):
            n = lay.num_tokens
            sample = int(rows[start])
            if not bool((rows[start : start + n] == sample).all()):
                raise RuntimeError(f"one {modality}'s placeholder tokens span two prompts")
            token_view, token_patch, caps, budget, shares = plan_views(self.method, config, lay)
            prunable = token_view >= 0
            plan = _Planned(lay, sample, cols[start : start + n], token_view, token_patch, budget, shares,
                            src=torch.full((n,), -1, dtype=torch.long), kept_count=int((~prunable).sum()))
            for v in range(len(lay.grids)):
                here = token_view == v
                if shares[v] >= caps[v]:
                    plan.kept_count += caps[v]  # the whole view fits its budget: nothing to rank
                else:
                    ranked.append((i, v, here, shares[v]))
            plans.append(plan)
            start += n
        grids = [layouts[i].grids[v] for i, v, _, _ in ranked]
        width = max((h * w for h, w in grids), default=0)
        valid = torch.zeros(len(ranked), width, dtype=torch.bool)
        for j, (i, _, here, _) in enumerate(ranked):
            patches = plans[i].token_patch[here]
            valid[j, patches] = True
            plans[i].src[here] = j * width + patches
        # where every token sits, and its row of the flattened (V, P) answer: copied once, non-blocking
        index = torch.cat([torch.stack([torch.full_like(p.positions, p.sample), p.positions, p.src]) for p in plans], 1)
        at_rows, at_cols, src = to_device(index, device)
        bounds = [0, *itertools.accumulate(p.positions.numel() for p in plans)]
        parts = [slice(a, b) for a, b in zip(bounds, bounds[1:])]
        ranked_views = [(i, v, b) for i, v, _, b in ranked]
        host_selection = None
        if ranked and self.method.host_select and not self.method.needs_features:  # shapes and options only
            host_selection = rank_views(self.method, layouts, ranked_views, valid, device)
        found = _CallPlan(
            plans=plans, ranked=ranked_views, valid=valid, at_rows=at_rows, at_cols=at_cols, src=src,
            src_clamped=src.clamp(min=0), ranked_token=src >= 0, parts=parts,
            positions=[at_cols[part] for part in parts], base_counts=[p.kept_count for p in plans],
            kept=torch.ones(src.shape, dtype=torch.bool, device=device),
            score=torch.full(src.shape, float("nan"), device=device), host_selection=host_selection,
        )
        if len(plans_cache) >= _PLANS_KEPT:  # a stream of ever-new shapes: start over rather than grow
            self.state._selection_plans = plans_cache = {}
        plans_cache[key] = found
        return found


def plan_views(method: Method, config, lay: ImageLayout) -> tuple[torch.Tensor, torch.Tensor, list[int], int, list[int]]:
    """Host arithmetic on the shapes of one image (video): its tokens' views and patches, each view's
    prunable count (cap), the image's budget and each view's share of it."""
    token_view, token_patch = lay.token_view.cpu(), lay.token_patch.cpu()
    prunable = token_view >= 0
    caps = torch.bincount(token_view[prunable], minlength=len(lay.grids)).tolist()
    budget = config.budget(int(prunable.sum()))
    shares = method.view_budgets(budget, caps, [h * w for h, w in lay.grids], config.budget,
                                 proportional=lay.split == "proportional")
    return token_view, token_patch, caps, budget, shares


def rank_views(method: Method, layouts: list[ImageLayout], ranked: list[tuple[int, int, int]], valid: torch.Tensor,
               device: torch.device, features: torch.Tensor | None = None):
    """The method's batched selection of the views ``ranked`` ((layout, view, budget) each) of one
    call, on the device. ``valid``: (V, P) host bool of each ranked view's valid patches."""
    keys = [r.key for r in getattr(method, "requests", [])]
    first = layouts[ranked[0][0]].signals[ranked[0][1]]  # the encoder stage's own signals, if recorded
    keys += [k for k in getattr(method, "signal_keys", ()) if k in first]
    width = valid.shape[1]
    batch = ViewBatch(
        grids=[layouts[i].grids[v] for i, v, _ in ranked],
        budgets=[b for _, _, b in ranked],
        valid=to_device(valid, device),
        valid_host=valid,
        signals={key: _pad_rows([layouts[i].signals[v][key].to(device) for i, v, _ in ranked], width, float("-inf"))
                 for key in keys},
        index=[v for _, v, _ in ranked],
        features=features,
    )
    return method.select_batch(batch)


class _EarlySelection(NamedTuple):
    """One modality's selection made before the language model's call (:meth:`Adapter._select_early`)."""

    call: dict[str, Any]  # the prefill's call record it was made for
    media: tuple  # the encoder call's (shape arguments, signals) it was made from
    keep_mask: torch.Tensor  # (B, L) bool: False at the dropped placeholders
    records: list[ImageRecord]
    provisional: bool  # made at the encoder-stage cut, before the feature function returned


def joined_signals(collected: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """An encoder call's collected statistics, each key's chunks joined on the last dimension."""
    return {k: torch.cat(v, dim=-1) if len(v) > 1 else v[0] for k, v in collected.items()}


@dataclass
class _Planned:
    """One image's (video's) share of a selection call, planned on the host."""

    layout: ImageLayout
    sample: int
    positions: torch.Tensor  # (n,) host: sequence positions of its tokens
    token_view: torch.Tensor
    token_patch: torch.Tensor
    budget: int
    shares: list[int]
    src: torch.Tensor  # (n,) host: each token's row of the flattened (V, P) answer, -1: kept as is
    kept_count: int | None  # host: tokens it keeps (None: the method's count is data-dependent)


#: call structures whose selection plans a wrapped model keeps (see :meth:`Adapter._call_plan`)
_PLANS_KEPT = 16


@dataclass(frozen=True)
class _CallPlan:
    """A selection call's plan (:meth:`Adapter._call_plan`): read-only, shared by every call of its
    structure (device tensors included: nothing writes them)."""

    plans: list[_Planned]
    ranked: list[tuple[int, int, int]]  # (plan, view, budget) of every view that needs ranking
    valid: torch.Tensor  # (V, P) host bool: each ranked view's valid patches
    at_rows: torch.Tensor  # (n,) device: every placeholder token's sample ...
    at_cols: torch.Tensor  # ... and sequence position ...
    src: torch.Tensor  # ... and its row of the flattened (V, P) answer (-1: kept as is)
    src_clamped: torch.Tensor  # src.clamp(min=0) and src >= 0, made once on the device rather than per call
    ranked_token: torch.Tensor
    parts: list[slice]  # each plan's tokens among the n
    positions: list[torch.Tensor]  # at_cols of each plan
    base_counts: list[int]  # tokens each plan keeps without ranking
    kept: torch.Tensor  # (n,) device True: the tokens nothing ranks
    score: torch.Tensor  # (n,) device nan
    host_selection: BatchSelection | None  # a host_select method's answer (shapes and options only)

    @property
    def width(self) -> int:
        """P: the widest ranked view."""
        return self.valid.shape[1]


def _plan_key(modality: str, layouts: list[ImageLayout], host_mask: torch.Tensor, device: torch.device) -> tuple:
    """What a selection plan depends on: the placeholders' positions and every layout's structure."""
    parts: list[Any] = [modality, str(device), tuple(host_mask.shape), host_mask.numpy().tobytes()]
    for lay in layouts:
        parts.append((tuple(lay.grids), lay.split, lay.token_view.cpu().numpy().tobytes(),
                      lay.token_patch.cpu().numpy().tobytes()))
    return tuple(parts)


def _view_features(embeds, at_rows, at_cols, src, rows: int) -> torch.Tensor:
    """(rows, D): the embedding of each ranked token at its row ``src`` of the flattened (V, P)
    views, zeros where no token sits."""
    ranked = src >= 0
    out = embeds.new_zeros(rows + 1, embeds.shape[-1])  # the last row takes the tokens not ranked
    out.index_put_((torch.where(ranked, src, rows),), embeds[at_rows, at_cols])
    return out[:rows]


def _merge_batch(embeds, at_rows, at_cols, src, assign, features) -> torch.Tensor:
    """Embeddings with each kept representative's row replaced by the mean of the patches assigned
    to it, for every ranked view at once (out of place). ``src``: (T,) each token's row in the
    flattened (V, P) views (-1: not ranked); ``assign``: (V, P) the representative patch of each
    patch (-1: dropped or padding); ``features``: (V, P, D) the views' embeddings."""
    views, width = assign.shape
    dump = views * width  # the sum row of unassigned patches
    base = torch.arange(views, device=assign.device)[:, None] * width
    target = torch.where(assign >= 0, base + assign, dump).flatten()  # (V * P,)
    sums = torch.zeros(dump + 1, embeds.shape[-1], dtype=torch.float32, device=embeds.device)
    sums.index_add_(0, target, features.reshape(dump, -1).float())
    count = torch.zeros(dump + 1, device=embeds.device)
    count.index_add_(0, target, torch.ones(dump, device=embeds.device))
    ranked = src >= 0
    mine = torch.where(ranked, src, dump)
    rep = ranked & (count[mine] > 0)
    mean = (sums[mine] / count[mine].clamp(min=1)[:, None]).to(embeds.dtype)
    rows = embeds[at_rows, at_cols]
    return embeds.index_put((at_rows, at_cols), torch.where(rep[:, None], mean, rows))


class InstanceOverride:
    """An instance attribute that stands in for a method of a wrapped module (``get_image_features``,
    ``generate``): a plain object rather than a closure, so ``copy.deepcopy`` and pickle carry it to the
    copy's own adapter. Its signature is the class method's, so ``generate`` still routes arguments to
    it; ``_original`` is the class's own method, bound to the module."""

    def __init__(self, module: nn.Module, name: str) -> None:
        self.module, self.name = module, name
        self.below = None  # an instance attribute of the same name that was there first (another wrapper)

    @property
    def _original(self):
        if self.below is not None:
            return self.below
        return getattr(type(self.module), self.name).__get__(self.module)

    @property
    def __signature__(self):
        return inspect.signature(self._original)

    def install(self):
        """Set the attribute (over another wrapper's, which it then calls); returns the function that
        removes it and puts back what was there."""
        self.below = self.module.__dict__.get(self.name)
        setattr(self.module, self.name, self)
        return functools.partial(_remove_instance_attribute, self.module, self.name, self, self.below)


class _FeatureFunction(InstanceOverride):
    """A feature function run under collection (see :meth:`Adapter._run_feature_function`)."""

    def __init__(self, adapter: Adapter, module: nn.Module, modality: str, name: str) -> None:
        super().__init__(module, name)
        self.adapter, self.modality = adapter, modality

    def __call__(self, *args, **kwargs):
        return self.adapter._run_feature_function(self._original, self.modality, args, kwargs)


class _OnHost(InstanceOverride):
    """A helper of a wrapped model's multimodal module run on host copies (:meth:`Adapter._host_call`)."""

    def __init__(self, adapter: Adapter, module: nn.Module, name: str, shape_only: bool) -> None:
        super().__init__(module, name)
        self.adapter, self.shape_only = adapter, shape_only

    def __call__(self, *args, **kwargs):
        return self.adapter._host_call(self._original, args, kwargs, self.shape_only)


def _host_result_on(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host result on ``device`` without a synchronisation; broadcast dimensions (stride 0, as in a
    mask expanded over the embedding width) are copied once and expanded again there."""
    compact = value
    for dim, (size, stride) in enumerate(zip(value.shape, value.stride())):
        if stride == 0 and size > 1:
            compact = compact.narrow(dim, 0, 1)
    return to_device(compact.contiguous(), device).expand(value.shape)


class _GenerateTurn(InstanceOverride):
    """``model.generate`` of a wrapped model: notes, for a later turn on a cache a pruned prefill
    produced, how many of the tokens generate will feed that cache already holds logically (generate
    slices the history at the cache's physical length). Everything else is the class's own generate."""

    def __init__(self, adapter: Adapter, model: nn.Module) -> None:
        super().__init__(model, "generate")
        self.adapter = adapter

    def __call__(self, *args, **kwargs):
        state = self.adapter.state
        cache = find_cache(kwargs)
        plan = state.plan_for(cache) if cache is not None else None
        ids = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("input_ids")
        physical = cache_length(cache) if plan is not None else 0
        if physical > 0 and ids is not None:  # a cache reset since its prefill holds nothing to continue
            logical = plan.prefill_len + (physical - plan.kept_len)
            if ids.shape[-1] > logical:  # the whole history: generate feeds ids[:, physical:]
                state._scratch["cached_prefix"] = (cache, logical - physical)
                kwargs = self.adapter.later_turn_arguments(kwargs, physical, logical)
        else:
            # generate encodes the media before the prefill forward: read the prompt now, while the GPU
            # queue is short, not after the encoder (the prefill's pre-hook finds this copy)
            embeds = kwargs.get("inputs_embeds")
            mask = kwargs.get("attention_mask")
            mask = mask if isinstance(mask, torch.Tensor) and mask.ndim == 2 else None
            if isinstance(ids, torch.Tensor) or isinstance(embeds, torch.Tensor):
                key = _prompt_key(ids if ids is not None else embeds, mask)
                state._scratch["prompt_on_host"] = (key, read_prompt(self.adapter, ids, embeds, mask, kwargs))
        state._scratch["generating"] = True
        try:
            return self._original(*args, **kwargs)
        finally:
            for key in ("cached_prefix", "generating", "decoding", "prompt_on_host"):
                state._scratch.pop(key, None)


def _remove_instance_attribute(module: nn.Module, name: str, value: Any, below: Any = None) -> None:
    if module.__dict__.get(name) is value:
        if below is None:
            delattr(module, name)
        else:
            setattr(module, name, below)


class Expanded(Exception):  # noqa: N818 - a signal, not an error
    """Raised by selection code that finds the batch expanded (see :func:`expansion`)."""

    def __init__(self, copies: int) -> None:
        super().__init__(copies)
        self.copies = copies


def expansion(found: int, expected: int, call: dict[str, Any], batch: int) -> int:
    """``copies`` when the batch is each prompt repeated ``copies`` times in a row, which is how
    ``generate`` expands it for beams and num_return_sequences after the encoder ran once on the
    unexpanded media (``found`` placeholders = copies x ``expected``); else 0."""
    copies = found // expected if expected else 0
    if copies < 2 or found != copies * expected or batch % copies:
        return 0
    ids = call.get("input_ids")
    ids = call["inputs_embeds"] if ids is None else ids
    grouped = ids.reshape(batch // copies, copies, *ids.shape[1:])
    return copies if bool((grouped == grouped[:, :1]).all()) else 0


def slice_view_signals(signals: dict[str, torch.Tensor], row: int, offset: int, n: int) -> dict[str, torch.Tensor]:
    """Per-view signals for encoders that run one view per batch row (CLIP, SigLIP)."""
    return {key: stats[row, offset : offset + n] for key, stats in signals.items()}


def host_shape_arguments(args: dict[str, Any]) -> dict[str, Any]:
    """A feature function's arguments with every small integer tensor (image_sizes, grid_thw,
    batch_num_images, ...) copied to the host, for the layouts' arithmetic."""
    out = dict(args)
    for name, value in args.items():
        if (isinstance(value, torch.Tensor) and value.numel() <= 65536 and not value.is_floating_point()
                and not value.is_complex() and value.dtype != torch.bool):
            out[name] = value.to("cpu", copy=True)
    return out


def _prompt_key(ids: torch.Tensor | None, mask: torch.Tensor | None) -> tuple:
    """Identity of a prompt's tensors (a view of the same data with the same shape matches)."""
    def one(t):
        return None if t is None else (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t._version)

    return one(ids), one(mask)


def _same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.device == b.device and a.data_ptr() == b.data_ptr() and a.shape == b.shape
                      and a.stride() == b.stride())


def read_prompt(adapter: Adapter, ids, embeds, mask, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """The host copies :meth:`Adapter._prompt_on_host` describes, in one device read; with the call's
    ``arguments``, also of the other tensors among them that a model helper may read on the host
    (``host:extra``, (tensor, copy) pairs): every other per-token integer tensor (Qwen's token types)
    and every small one (grids, Qwen's seconds per video grid), in one more read per other dtype."""
    if ids is None and embeds is None:
        return {}
    call = {"input_ids": ids, "inputs_embeds": embeds}
    modalities = list(adapter.feature_functions)
    if ids is not None:
        parts = [ids.long()]
    else:  # placeholders are rows equal to the token's embedding: compared on the device
        parts = [adapter._placeholder_mask(m, call).long() for m in modalities]
    if mask is not None:
        parts.append(mask.to(parts[0].device).long())
    rows = len(parts)
    extra = [v for v in (arguments or {}).values() if isinstance(v, torch.Tensor) and v is not ids and v is not mask
             and v.device == parts[0].device and v.dtype != torch.bool and not v.is_complex()
             and (v.numel() <= 4096 or (ids is not None and v.shape == ids.shape and not v.is_floating_point()))]
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for v in extra:
        by_dtype.setdefault(torch.long if not v.is_floating_point() else v.dtype, []).append(v)
    longs = by_dtype.pop(torch.long, [])
    # the one read (before the encoder: the queue is short); the ints of the other tensors ride along
    flat = torch.cat([p.flatten() for p in parts] + [v.flatten().long() for v in longs]).to("cpu", copy=True)
    host = flat[: rows * parts[0].numel()].view(rows, *parts[0].shape)
    out: dict[str, Any] = {"host:mask": mask}
    copies = list(zip(longs, _unflatten(flat[host.numel():], longs)))
    for values in by_dtype.values():  # one read per other dtype
        copies += zip(values, _unflatten(torch.cat([v.flatten() for v in values]).to("cpu", copy=True), values))
    if copies:
        out["host:extra"] = copies
    if ids is not None:
        out["host:ids"] = host[0]
        for m in modalities:
            out[f"host:{m}"] = host[0] == adapter.placeholder_id(m)
    else:
        for j, m in enumerate(modalities):
            out[f"host:{m}"] = host[j].bool()
    if mask is not None:
        out["host:real"] = (host[-1] != 0).sum(1)
        out["host:mask_values"] = host[-1]
    return out


def _unflatten(flat: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    """``flat`` (the tensors of ``like`` flattened and joined) split back into their shapes and dtypes."""
    out, start = [], 0
    for v in like:
        out.append(flat[start : start + v.numel()].view(v.shape).to(v.dtype))
        start += v.numel()
    return out
