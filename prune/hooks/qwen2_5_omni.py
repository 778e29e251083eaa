"""Qwen2.5-Omni: the thinker (Qwen2_5OmniThinkerForConditionalGeneration), images, videos, audio and
videos with their audio track interleaved (``use_audio_in_video=True``).

The vision encoder is Qwen2.5-VL's (window attention, 2x2 merge), so images and video frames are
views exactly as in :mod:`.qwen2_5_vl`. Audio comes from a Whisper-style encoder: 25 LLM tokens per
second. TMRoPE gives every audio and video token a temporal position id in the same unit (25 per
second): video temporal slice s sits at ``int(s * video_second_per_grid * 25)``, audio token k at k
(both offset by where the media starts). With ``use_audio_in_video`` the processor cuts both streams
into 2-second chunks (``seconds_per_chunk``) and lays them out chunk by chunk: video chunk 0, audio
chunk 0, video chunk 1, ... That chunk is the *window* of a token here.

Budgets:
- view-based methods (random, pool, hiprune) prune image and video tokens as on Qwen2.5-VL (per image /
  video, spread over temporal slices); audio tokens are never pruned by them.
- joint methods (``avpool``: a method with ``joint = True`` and ``select_pool``) get *pools*: a video
  together with its interleaved audio track, or a lone video, or a lone audio clip, with every
  token's modality and window; the method keeps ``keep`` x the pool's tokens in total. Images still go
  through the view-based path (one image = one view).

Positions stay "original": kept tokens keep their TMRoPE (t, h, w) ids, so surviving audio and video
tokens stay time-aligned, and decoding continues from the unpruned prompt's ``rope_deltas``.

Wrapping a full Qwen2_5OmniForConditionalGeneration wraps its thinker. Speech output (the talker) is
refused with a ValueError: the talker reads the thinker's prefill hidden states row by row over the
full prompt (``input_ids``), which a pruned prefill does not have; ``generate(...,
generation_mode="text")`` works.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .._compat import past_length
from ..state import ImageRecord
from .base import Expanded, InstanceOverride, bind_arguments, expansion
from .qwen2_5_vl import Qwen25VLAdapter

MODALITY_IDS = {"video": 0, "audio": 1}  # the order of prune.methods.avpool.MODALITIES


@dataclass
class AVRecord(ImageRecord):
    """An :class:`ImageRecord` of one video or audio item that a joint method pruned in a pool.

    window: (n,) long, the 2-second window of each token inside its pool (0 = the pool's first chunk).
    time: (n,) long, each token's TMRoPE temporal offset from the pool's start (25 per second).
    pool: number of the pool in this prefill (items of one pool share it).
    pool_budget: tokens the pool was allowed in total (``keep`` x its audio + video tokens).
    ``budget`` is what this item ended up with (joint) or was given (``budget="per_modality"``).
    ``grids``: video (h, w) per temporal slice; audio [(1, n)] (a row of n tokens, 25 per second).
    """

    window: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    time: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    pool: int = 0
    pool_budget: int = 0


@dataclass
class _Item:
    """One video or audio clip of one prompt, as its tokens sit in the prefill."""

    modality: str
    sample: int
    positions: torch.Tensor  # (n,) sequence positions, ascending
    time: torch.Tensor  # (n,) TMRoPE temporal offset from the item's start
    grids: list[tuple[int, int]]

    @property
    def first(self) -> int:
        return int(self.positions[0])

    @property
    def last(self) -> int:
        return int(self.positions[-1])


class Qwen25OmniAdapter(Qwen25VLAdapter):
    family = "qwen2_5_omni"
    model_classes = ("Qwen2_5OmniThinkerForConditionalGeneration", "Qwen2_5OmniForConditionalGeneration")
    feature_functions = {
        "image": "get_image_features",
        "video": "get_video_features",
        "audio": "get_audio_features",
    }
    position_modes = ("original",)
    # the joint audio-visual selection needs the video and the audio call together, and this
    # family's pre-hook adds to the call's record after the base one: it selects at the language model
    early_selection = False

    def __init__(self, model: nn.Module) -> None:
        # A full Omni model (thinker + talker + token2wav): prune its thinker.
        self.full = model if type(model).__name__ == "Qwen2_5OmniForConditionalGeneration" else None
        super().__init__(model.thinker if self.full is not None else model)

    # ---- modules (transformers 5.17: the thinker holds the encoders and `model` is the text model;
    # later releases: `thinker.model` holds the encoders and `thinker.model.language_model`) -------
    def multimodal_module(self) -> nn.Module:
        inner = self.model.model
        return inner if hasattr(inner, "language_model") else self.model

    def language_model(self) -> nn.Module:
        mm = self.multimodal_module()
        return mm.language_model if mm is not self.model else self.model.model

    def visual(self) -> nn.Module:
        return self.multimodal_module().visual

    def audio_tower(self) -> nn.Module:
        return self.multimodal_module().audio_tower

    def placeholder_id(self, modality: str) -> int:
        config = self.model.config
        return int({"image": config.image_token_id, "video": config.video_token_id,
                    "audio": config.audio_token_id}[modality])

    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def chunk_positions(self) -> int:
        """TMRoPE position ids per window: position_id_per_seconds x seconds_per_chunk (50)."""
        config = self.model.config
        return int(config.position_id_per_seconds * config.seconds_per_chunk)

    # ---- install: refuse speech output on a full model ------------------------------------------
    def install(self, state, method) -> None:
        super().install(state, method)
        if self.full is not None:
            state._removers.append(_guard_speech(self.full))

    # ---- the flow ---------------------------------------------------------------------------
    def _is_joint(self) -> bool:
        return bool(getattr(self.method, "joint", False)) and getattr(self, "decoder_cut", None) is None

    def _on_multimodal_call(self, module, args, kwargs):
        super()._on_multimodal_call(module, args, kwargs)
        if args:
            kwargs = bind_arguments(module.forward, args, kwargs)
        if self.state._call and past_length(kwargs) == 0:
            self.state._call["video_second_per_grid"] = kwargs.get("video_second_per_grid")
            self.state._call["attention_mask"] = kwargs.get("attention_mask")
        return None

    @property
    def _av_media(self):
        """This call's video and audio encoder arguments for the joint selection (per thread)."""
        return self.state._scratch.get("av_media")

    @_av_media.setter
    def _av_media(self, value) -> None:
        self.state._scratch["av_media"] = value

    def _on_language_model_call(self, module, args, kwargs):
        state = self.state
        prefill = kwargs.get("inputs_embeds") is not None and past_length(kwargs) == 0
        self._av_media = None
        if prefill and state._call and self._is_joint():
            # The base flow calls _select per modality; the joint selection needs the video and the
            # audio encoder calls together, so it runs once, at the first of the two (see _select).
            self._av_media = {m: state._media[m][0] for m in ("video", "audio") if m in state._media}
        return super()._on_language_model_call(module, args, kwargs)

    def _select(self, modality, call, fn_args, signals, embeds, keep_mask, records):
        av_media = self._av_media
        if modality in ("video", "audio") and av_media is not None:
            self._av_media = {}  # consumed: the other modality's turn is a no-op
            if not av_media:
                return embeds
            try:
                return self._select_pools(call, av_media, embeds, keep_mask, records)
            except Expanded as expanded:
                def select(c, e, k, r):
                    return self._select_pools(c, av_media, e, k, r)

                return self._select_expanded(expanded.copies, select, call, embeds, keep_mask, records)
        if modality == "audio":
            return embeds  # view-based methods prune the visual part only
        return super()._select(modality, call, fn_args, signals, embeds, keep_mask, records)

    # ---- joint audio-visual pools -------------------------------------------------------------
    def _items(self, call: dict[str, Any], av_args: dict[str, dict], device) -> list[_Item]:
        """Every video and audio item of the prefill with its token positions and TMRoPE times."""
        items: list[_Item] = []
        config = self.model.config
        pps = config.position_id_per_seconds
        m = self.merge_size()
        if "video" in av_args:
            grid_thw = av_args["video"].get("video_grid_thw")
            if grid_thw is None:
                raise ValueError("video_grid_thw is needed with the video pixel values")
            grid_thw = torch.as_tensor(grid_thw).cpu()
            spg = call.get("video_second_per_grid")  # the processor's value; 1.0 = its default (2 fps)
            spg = [1.0] * len(grid_thw) if spg is None else torch.as_tensor(spg).cpu().float().view(-1)
            counts = [t * h * w // (m * m) for t, h, w in grid_thw.tolist()]
            chunks = self._split_tokens("video", call, counts, device)
            for i, ((t, h, w), (sample, pos)) in enumerate(zip(grid_thw.tolist(), chunks)):  # none if stale
                per_slice = (h // m) * (w // m)
                # exactly get_rope_index's arithmetic (fp32 product, then truncation)
                times = (torch.arange(t) * torch.as_tensor(spg[i]).float() * pps).long()
                items.append(_Item("video", sample, pos, times.repeat_interleave(per_slice).to(device),
                                   [(h // m, w // m)] * t))
        if "audio" in av_args:
            args = av_args["audio"]
            mask, lengths = args.get("feature_attention_mask"), args.get("audio_feature_lengths")
            lengths = mask.sum(-1) if mask is not None else lengths
            if lengths is None:
                raise ValueError("feature_attention_mask is needed with input_features")
            _, tokens = self.audio_tower()._get_feat_extract_output_lengths(torch.as_tensor(lengths).cpu())
            counts = [int(n) for n in tokens.view(-1).tolist()]
            for sample, pos in self._split_tokens("audio", call, counts, device):
                n = pos.numel()
                items.append(_Item("audio", sample, pos, torch.arange(n, device=device), [(1, n)]))
        return items

    def _split_tokens(self, modality, call, counts, device) -> list[tuple[int, torch.Tensor]]:
        """(sample, positions) of each item: the modality's placeholders in scatter order, cut by counts."""
        rows, cols = self._placeholder_mask(modality, call).to(device).nonzero(as_tuple=True)
        if rows.numel() == 0:
            return []  # the encoder ran for another call (e.g. get_video_features called directly)
        if rows.numel() and rows.numel() < sum(counts) and sum(counts) % rows.numel() == 0:
            # selecting for the first copy of each prompt of an expanded batch, with media arguments
            # that generate expanded with it (audio feature masks): one item per group of copies
            copies = sum(counts) // rows.numel()
            if len(counts) % copies == 0 and all(len(set(counts[i : i + copies])) == 1 for i in range(0, len(counts), copies)):
                counts = counts[::copies]
        if rows.numel() != sum(counts):
            copies = expansion(rows.numel(), sum(counts), call, self._placeholder_mask(modality, call).shape[0])
            if copies:
                raise Expanded(copies)  # beams / num_return_sequences: select per prompt, then copy
            raise RuntimeError(
                f"found {rows.numel()} {modality} placeholder tokens but the inputs give {sum(counts)}"
            )
        out, start = [], 0
        for n in counts:
            sample = int(rows[start])
            if not bool((rows[start : start + n] == sample).all()):
                raise RuntimeError(f"one {modality}'s placeholder tokens span two prompts")
            out.append((sample, cols[start : start + n]))
            start += n
        return out

    @staticmethod
    def _pools(items: list[_Item]) -> list[list[_Item]]:
        """A video and the audio interleaved into it (its first audio token lies inside the video's
        span, or right after it) form one pool; every other item is a pool of its own."""
        videos = [it for it in items if it.modality == "video"]
        audios = [it for it in items if it.modality == "audio"]
        used: set[int] = set()
        pools = []
        for v in videos:
            partner = next(
                (i for i, a in enumerate(audios)
                 if i not in used and a.sample == v.sample and v.first < a.first <= v.last + 1),
                None,
            )
            if partner is None:
                pools.append([v])
            else:
                used.add(partner)
                pools.append([v, audios[partner]])
        pools += [[a] for i, a in enumerate(audios) if i not in used]
        return sorted(pools, key=lambda p: (p[0].sample, min(it.first for it in p)))

    def _prompt_rows(self, call, sample: int, pool_positions: torch.Tensor, length: int, device):
        """Positions of the instruction: the text tokens after the pool (before it when none follow)."""
        text = torch.ones(length, dtype=torch.bool, device=device)
        for modality in self.feature_functions:
            text &= ~self._placeholder_mask(modality, call)[sample].to(device)
        mask = call.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            text &= mask[sample].to(device).bool()
        after = text.clone()
        after[: int(pool_positions.max()) + 1] = False
        return torch.nonzero(after if bool(after.any()) else text, as_tuple=True)[0]

    def _select_pools(self, call, av_args, embeds, keep_mask, records):
        from ..methods.avpool import AVPool

        device = embeds.device
        config = self.state.config
        chunk = self.chunk_positions()
        wants_prompt = float(getattr(self.method, "options", {}).get("prompt_weight", 0.0) or 0.0) > 0
        for number, pool in enumerate(self._pools(self._items(call, av_args, device))):
            sample = pool[0].sample
            positions = torch.cat([it.positions for it in pool])
            modality = torch.cat([torch.full_like(it.positions, MODALITY_IDS[it.modality]) for it in pool])
            time = torch.cat([it.time for it in pool])
            order = torch.argsort(positions)  # prompt order
            positions, modality, time = positions[order], modality[order], time[order]
            window = time // chunk
            counts = [int((modality == i).sum()) for i in range(len(MODALITY_IDS))]
            budget = config.budget(len(positions))
            prompt = None
            if wants_prompt:
                prompt = embeds[sample, self._prompt_rows(call, sample, positions, embeds.shape[1], device)]
            sel = self.method.select_pool(AVPool(
                features=embeds[sample, positions], modality=modality, window=window, budget=budget,
                modality_budgets=tuple(config.budget(c) for c in counts), prompt=prompt,
            ))
            kept = torch.zeros(len(positions), dtype=torch.bool, device=device)
            kept[sel.keep.to(device)] = True
            keep_mask[sample, positions] = kept
            score = torch.full(time.shape, float("nan"), device=device)
            if sel.score is not None:
                score = sel.score.to(device).float()
            per_modality = self.method.options.get("budget") == "per_modality"
            for it in pool:
                mine = modality == MODALITY_IDS[it.modality]
                records.append(AVRecord(
                    sample=sample, positions=positions[mine], kept=kept[mine], scores={"score": score[mine]},
                    budget=config.budget(int(mine.sum())) if per_modality else int(kept[mine].sum()),
                    grids=list(it.grids), modality=it.modality, window=window[mine], time=time[mine],
                    pool=number, pool_budget=budget,
                ))
        return embeds


class _SpeechGuard(InstanceOverride):
    """``full.generate`` while the thinker is pruned: refuses speech output (the talker)."""

    def __call__(self, *args, **kwargs):
        full = self.module
        mode = kwargs.get("generation_mode")
        text_only = mode in ("text", False) or kwargs.get("return_audio", True) is False
        if not text_only and getattr(full, "has_talker", False):
            raise ValueError(
                "generation_mode: prune cannot run the Qwen2.5-Omni talker (speech output) on a pruned "
                "thinker: the talker reads the thinker's prefill hidden states position by position over "
                "the full prompt, and a pruned prefill only has the kept rows. Pass generation_mode='text' "
                "for text, or prune.unwrap(model) for speech."
            )
        return self._original(*args, **kwargs)


def _guard_speech(full: nn.Module):
    """Make ``full.generate`` refuse speech output (the talker) while the thinker is pruned."""
    return _SpeechGuard(full, "generate").install()
