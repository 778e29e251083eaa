"""The adapter interface and the flow every adapter shares.

An adapter names a family's modules and tells where each image's (or video's) tokens sit and
which encoder statistics belong to them; everything else (signal collection, budgets, selection,
the cut, decoding) is done here, the same for all families.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .._compat import cache_length, find_cache
from ..kernels import attention_stats
from ..methods import EncoderInfo, Method, SignalRequest, View
from ..state import ImageRecord, PruneRecord, PruneState
from .attention_tap import install_tap
from .cutter import cut_prefill, map_decode, two_d_mask


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
        self.decoder_cut = None
        if getattr(method, "in_llm", False):
            from .decoder_cut import DecoderCut

            self.decoder_cut = DecoderCut(self, method, state)
            self.decoder_cut.install()
            mm = self.multimodal_module()
            lm = self.language_model()
            h1 = mm.register_forward_pre_hook(self._on_multimodal_call, with_kwargs=True)
            h2 = lm.register_forward_pre_hook(self._on_language_model_call, with_kwargs=True)
            h3 = lm.register_forward_hook(self._after_language_model)
            state._removers.extend([h1.remove, h2.remove, h3.remove])
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
        collected: dict[str, list[torch.Tensor]] = {}
        state._collecting = collected
        try:
            out = original(*args, **kwargs)
        finally:
            state._collecting = None
        signals = {k: torch.cat(v, dim=-1) if len(v) > 1 else v[0] for k, v in collected.items()}
        state._media[modality] = (bind_arguments(original, args, kwargs), signals)
        # generate(use_cache=False) passes these same encoder outputs to every step's prefill
        state._encoded[modality] = (out, state._media[modality])
        return out

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
            collected.setdefault(req.key, []).append(stats)

    def _on_multimodal_call(self, module, args, kwargs):
        if args:  # some families pass input_ids positionally
            kwargs = bind_arguments(module.forward, args, kwargs)
        cache = find_cache(kwargs)
        if cache_length(cache) > 0:
            # a decode step, or a later turn on a cache a pruned prefill produced: the language-model
            # hook maps it; media in the uncached part of a later turn cannot be placed on that cache
            if self.state.plan_for(cache) is not None:
                if any(kwargs.get(name) is not None for name in self._media_arguments(module)):
                    self.state._media = {"media": None}  # the encoder will run inside this forward
                self._refuse_new_media()
            return None
        self.state._call = {"input_ids": kwargs.get("input_ids"), "inputs_embeds": kwargs.get("inputs_embeds")}
        for modality, output in (kwargs.get("mm_encoder_outputs") or {}).items():
            cached = self.state._encoded.get(modality)
            if modality not in self.state._media and cached is not None and cached[0] is output:
                self.state._media[modality] = cached[1]  # a re-used encoder output (no KV cache)
        return None

    def _take_cached_prefix(self, cache) -> int:
        """Leading tokens of this call's input that the pruned cache already holds logically: a later
        turn's ``generate`` (history + new tokens) keeps the tokens past the cache's *physical* length,
        which pruning made shorter (set by :class:`_GenerateTurn`, consumed by the first forward)."""
        pending = self.state._scratch.pop("cached_prefix", None)
        if pending is None or pending[0] is not cache:
            return 0
        return pending[1]

    def _media_arguments(self, module: nn.Module) -> list[str]:
        """The forward's media arguments: the first parameter of each feature function (by signature)."""
        names = []
        for name in self.feature_functions.values():
            fn = getattr(type(module), name, None)
            params = list(inspect.signature(fn).parameters)[1:] if fn is not None else []
            if params:
                names.append(params[0])
        return names

    def _refuse_new_media(self) -> None:
        """A later turn on a pruned cache whose call ran the vision encoder (new media) cannot be placed."""
        if self.state._media:
            modalities = ", ".join(sorted(self.state._media))
            self.state._media = {}
            raise ValueError(
                f"past_key_values: this call passes new media ({modalities}) with a cache that a pruned "
                "prefill produced; prune cannot place new media on a pruned cache. Pass the whole history "
                "with all its media and no past_key_values (the prompt is pruned afresh), or unwrap the model."
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

    def _on_language_model_call(self, module, args, kwargs):
        state = self.state
        if kwargs.get("inputs_embeds") is None:
            return None
        cache = find_cache(kwargs)
        past_len = cache_length(cache)
        if self.decoder_cut is not None:
            return self._start_llm_call(kwargs, cache, past_len)
        if past_len > 0:
            plan = state.plan_for(cache)
            if plan is None:
                return None
            self._refuse_new_media()  # older transformers run the encoder inside the forward
            return args, map_decode(kwargs, plan, past_len, drop=self._take_cached_prefix(cache))
        call, media = state._call, state._media
        state._call, state._media = {}, {}
        state.set_plan(cache, None)
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        keep_mask = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        records: list[ImageRecord] = []
        if call:
            for modality in self.feature_functions:
                if modality in media:
                    fn_args, signals = media[modality]
                    embeds = self._select(modality, call, fn_args, signals, embeds, keep_mask, records)
                elif bool(self._placeholder_mask(modality, call).any()):
                    warnings.warn(
                        f"the prompt holds {modality} tokens but the vision encoder did not run under prune "
                        "(pre-computed features?): they are not pruned",
                        stacklevel=2,
                    )
        padding = _padding(kwargs, keep_mask)
        if bool(keep_mask.all()):
            # no media, or nothing removed (keep=1.0): the model runs untouched
            state.last = PruneRecord(keep_mask=keep_mask, images=records, positions=state.positions, padding=padding)
            return None
        kwargs = dict(kwargs, inputs_embeds=embeds)
        new_kwargs, plan, positions = cut_prefill(kwargs, keep_mask, state.positions)
        # the rows the cut packed (padding is never kept)
        new_kwargs = self.cut_sequence_arguments(kwargs, new_kwargs, keep_mask & ~padding.to(keep_mask.device))
        state.set_plan(cache, plan)
        state.last = PruneRecord(
            keep_mask=keep_mask, images=records, positions=state.positions, position_ids=positions, padding=padding
        )
        return args, new_kwargs

    # ---- in-LLM methods: the language model's input is untouched; decoder layers cut ---------------
    def _start_llm_call(self, kwargs, cache, past_len: int):
        state, cut = self.state, self.decoder_cut
        if past_len > 0:
            cut.start_decode(kwargs, cache, past_len)
            return None
        call = state._call
        state._call = {}
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        vision = torch.zeros(batch, length, dtype=torch.bool, device=embeds.device)
        records = []
        if call:
            for modality in self.feature_functions:
                placeholders = self._placeholder_mask(modality, call).to(embeds.device)
                vision |= placeholders
                for b in range(batch):
                    pos = torch.nonzero(placeholders[b], as_tuple=True)[0]
                    if pos.numel():
                        records.append(ImageRecord(sample=b, positions=pos, kept=torch.ones_like(pos, dtype=torch.bool),
                                                   scores={}, budget=int(pos.numel()), grids=[], modality=modality))
        keep_mask = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        state.last = PruneRecord(
            keep_mask=keep_mask, images=records, positions=state.positions, padding=_padding(kwargs, keep_mask)
        )
        if bool(vision.any()):
            cut.start_prefill(kwargs, cache, vision)
        else:
            cut.context = None
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

        Ranking runs on the host: a view holds a few hundred to a few thousand scores, which the CPU
        ranks in microseconds while on a GPU every small op is a launch (and many a sync). Only the
        statistics travel (once per call), and merged rows are computed on the model's device."""
        signals = {key: stats.detach().float().cpu() for key, stats in signals.items()}
        try:
            layouts = self.layouts(modality, fn_args, signals)
        except Expanded as expanded:  # an adapter that reads layouts off the prompt found copies
            def select_first(c, e, k, r):
                return self._select(modality, c, fn_args, signals, e, k, r)

            return self._select_expanded(expanded.copies, select_first, call, embeds, keep_mask, records)
        rows, cols = self._placeholder_mask(modality, call).cpu().nonzero(as_tuple=True)  # scatter order
        expected = sum(lay.num_tokens for lay in layouts)
        if rows.numel() == 0:
            return embeds  # the encoder ran for another call (e.g. get_image_features called directly)
        if rows.numel() != expected:
            copies = expansion(rows.numel(), expected, call, keep_mask.shape[0])
            if copies:
                def select(c, e, k, r):
                    return self._select(modality, c, fn_args, signals, e, k, r)

                return self._select_expanded(copies, select, call, embeds, keep_mask, records)
            raise RuntimeError(f"found {rows.numel()} {modality} placeholder tokens but the inputs give {expected}")
        config = self.state.config
        device = embeds.device
        start = 0
        merged_any = False
        for lay in layouts:
            n = lay.num_tokens
            sample = int(rows[start])
            pos = cols[start : start + n]
            if not bool((rows[start : start + n] == sample).all()):
                raise RuntimeError(f"one {modality}'s placeholder tokens span two prompts")
            start += n
            token_view = lay.token_view.cpu()
            token_patch = lay.token_patch.cpu()
            prunable = token_view >= 0
            caps = torch.bincount(token_view[prunable], minlength=len(lay.grids)).tolist()
            budget = config.budget(int(prunable.sum()))
            shares = self.method.view_budgets(budget, caps, [h * w for h, w in lay.grids], config.budget,
                                              proportional=lay.split == "proportional")
            kept = ~prunable
            score = torch.full((n,), float("nan"))
            for v, (h, w) in enumerate(lay.grids):
                here = token_view == v
                if shares[v] >= caps[v]:
                    kept[here] = True  # the whole view fits its budget: nothing to rank
                    continue
                n_patch = h * w
                valid = torch.zeros(n_patch, dtype=torch.bool)
                valid[token_patch[here]] = True
                features = None
                if self.method.needs_features:
                    features = embeds.new_zeros(n_patch, embeds.shape[-1])
                    features[token_patch[here].to(device)] = embeds[sample, pos[here].to(device)]
                view_signals = {key: sig.cpu().float() for key, sig in lay.signals[v].items()}
                view = View(grid=(h, w), budget=shares[v], valid=valid, signals=view_signals, features=features, index=v)
                sel = self.method.select(view)
                keep_patch = torch.zeros(n_patch, dtype=torch.bool)
                keep_patch[sel.keep.cpu()] = True
                kept[here] = keep_patch[token_patch[here]]
                if sel.score is not None:
                    score[here] = sel.score.cpu().float()[token_patch[here]]
                if sel.assign is not None:
                    if not merged_any:
                        embeds, merged_any = embeds.clone(), True
                    _merge_into(embeds, sample, pos[here].to(device), token_patch[here].to(device),
                                sel.assign.to(device), features)
            keep_mask[sample, pos.to(device)] = kept.to(device)
            records.append(
                ImageRecord(
                    sample=sample,
                    positions=pos,
                    kept=kept,
                    scores={"score": score},
                    budget=budget,
                    grids=list(lay.grids),
                    modality=modality,
                    merged=embeds[sample, pos[kept].to(device)].detach() if self.method.needs_features else None,
                    token_view=token_view,
                    token_patch=token_patch,
                    view_budgets=list(shares),
                )
            )
        return embeds


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
        try:
            return self._original(*args, **kwargs)
        finally:
            state._scratch.pop("cached_prefix", None)


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


def _merge_into(embeds, sample, pos, patches, assign, features) -> None:
    """Replace each kept representative's row by the mean of the patches assigned to it (in place)."""
    n_patch, dim = features.shape
    member = assign >= 0
    sums = torch.zeros(n_patch, dim, dtype=torch.float32, device=embeds.device)
    sums.index_add_(0, assign[member], features[member].float())
    count = torch.zeros(n_patch, device=embeds.device)
    count.index_add_(0, assign[member], torch.ones(int(member.sum()), device=embeds.device))
    reps = count[patches] > 0
    embeds[sample, pos[reps]] = (sums[patches[reps]] / count[patches[reps], None]).to(embeds.dtype)


def slice_view_signals(signals: dict[str, torch.Tensor], row: int, offset: int, n: int) -> dict[str, torch.Tensor]:
    """Per-view signals for encoders that run one view per batch row (CLIP, SigLIP)."""
    return {key: stats[row, offset : offset + n] for key, stats in signals.items()}
