"""`prune demo`: a small LLaVA built in code prunes a generated image with every method.

No downloads: the model has random weights (its answers are noise); what the demo shows is the
token counts, the timings and which patches each method kept.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import CLIPImageProcessor

import prune

from .._tiny import IMAGE_TOKEN, tiny_llava
from .visualize import labelled_grid, overlay_kept

SIZE = 336
PATCH = 14


def scene(seed: int = 0, size: int = SIZE) -> Image.Image:
    """A few coloured shapes and a digit at random places on a light background."""
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (235, 232, 225))
    draw = ImageDraw.Draw(img)
    colours = [(220, 40, 40), (40, 120, 220), (40, 170, 80), (240, 190, 30), (140, 60, 170)]
    for _ in range(5):
        x, y, r = rng.randint(20, size - 60), rng.randint(20, size - 60), rng.randint(12, 36)
        box = (x, y, x + 2 * r, y + 2 * r)
        colour = rng.choice(colours)
        if rng.random() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    draw.text(
        (rng.randint(10, size - 30), rng.randint(10, size - 30)), str(rng.randint(0, 9)), fill=(0, 0, 0)
    )
    return img


def _tokens_seen(model, last, rec) -> int:
    """Vision tokens of one image the language model read: what was kept, or for in-LLM methods the
    average over decoder layers of what each layer saw."""
    if not last.layer_masks:
        return rec.tokens_after
    layers = model.config.text_config.num_hidden_layers
    return round(sum(int(last.seen_by(i)[0, rec.positions].sum()) for i in range(layers)) / layers)


def llm_keep(method: str, keep: float | int, num_layers: int) -> float | int:
    """``keep`` for encoder-side methods; for an in-LLM method whose floor on ``num_layers`` layers
    (the share the layers before its first cut see) is ``keep`` or more, a keep it can honour: the
    floor plus a fifth of what is left above it."""
    from ..methods import get_method

    cls = get_method(method)
    if not getattr(cls, "in_llm", False) or not isinstance(keep, float) or keep >= 1.0:
        return keep
    floor = cls().min_keep(num_layers)
    return keep if keep > floor + 1e-9 else round(floor + (1.0 - floor) / 5, 2)


def _median_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run_demo(
    out_dir: str | Path = "prune-demo", keep: float = 0.25, seed: int = 0, new_tokens: int = 8
) -> Path:
    """Run every method on one generated image; print a table and write ``kept.png``."""
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = tiny_llava(
        image_size=SIZE,
        patch=PATCH,
        vision_layers=6,
        vision_hidden=64,
        text_hidden=128,
        text_layers=8,  # enough depth for the in-LLM methods' cuts
        attn_implementation="sdpa",
        seed=seed,
    )
    processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    image = scene(seed)
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    side = SIZE // PATCH
    n = side * side
    prompt = torch.tensor([[1, 10, 11, 12] + [IMAGE_TOKEN] * n + [13, 14, 15, 16]])
    inputs = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "pixel_values": pixel_values}
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}

    rows, tiles = [], [("original", image)]
    skipped = []
    for method in ["none", *sorted(prune.available_methods())]:
        label = method
        if method != "none":
            method_keep = llm_keep(method, keep, model.config.text_config.num_hidden_layers)
            if method_keep != keep:
                label = f"{method}@{method_keep}"
            try:
                prune.wrap(model, method, keep=method_keep)
            except (TypeError, ValueError) as err:  # e.g. a method for another model family
                skipped.append(f"{method} ({err})")
                continue
        with torch.no_grad():
            model(**inputs)  # warm-up
            prefill = _median_ms(lambda: model(**inputs))
            total = _median_ms(lambda: model.generate(**inputs, **gen))
            out = model.generate(**inputs, **gen)
        answer = out[0, prompt.shape[1] :].tolist()
        if method == "none":
            rows.append((method, n, n, prefill, total, answer))
            continue
        last = model.prune_state.last
        rec = last.images[0]
        after = _tokens_seen(model, last, rec)
        rows.append((label, rec.tokens_before, after, prefill, total, answer))
        tiles.append((f"{label}: {after}/{rec.tokens_before}", overlay_kept(image, rec.kept, (side, side))))
        prune.unwrap(model)

    print(f"tiny random LLaVA (CLIP {SIZE}px/{PATCH}, {n} vision tokens), keep={keep}")
    print(f"{'method':<15} {'tokens':>9} {'prefill ms':>11} {'generate ms':>12}  first tokens")
    for method, before, after, prefill, total, answer in rows:
        print(f"{method:<15} {f'{after}/{before}':>9} {prefill:>11.1f} {total:>12.1f}  {answer[:6]}")
    for note in skipped:
        print(f"skipped {note}")
    print("in-LLM methods (fastv, pdrop, transprune): tokens = average per decoder layer; the picture shows")
    print("what their last layers see; method@k: run at keep=k, the keep given being at or below the share")
    print("the layers before its first cut see alone (its floor on this 8-layer LM)")
    path = out_dir / "kept.png"
    labelled_grid(tiles, columns=3).save(path)
    print(f"kept patches: {path}")
    return path


def run_video_demo(path: str | Path, out_dir: str | Path = "prune-demo", keep: float = 0.25, seed: int = 0,
                   num_frames: int = 8) -> Path:
    """Prune a video file's tokens on a small Qwen2.5-VL built in code; print a table and write
    ``kept_video.png`` (one row per method, one tile per temporal slice of 2 frames)."""
    from transformers import Qwen2VLVideoProcessor

    from .._tiny import QWEN_END, QWEN_MERGE, QWEN_START, QWEN_VIDEO, tiny_qwen_vl
    from ..io import load_video

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames = load_video(path, num_frames=num_frames)
    processor = Qwen2VLVideoProcessor(patch_size=PATCH, temporal_patch_size=2, merge_size=QWEN_MERGE,
                                      size={"shortest_edge": 56 * 56, "longest_edge": 224 * 224})
    media = processor(videos=[frames], return_tensors="pt", do_sample_frames=False)
    t, h, w = media["video_grid_thw"][0].tolist()
    n = t * h * w // (QWEN_MERGE * QWEN_MERGE)
    ids = torch.tensor([[1, 10, 11, QWEN_START] + [QWEN_VIDEO] * n + [QWEN_END, 12, 13]])
    types = (ids == QWEN_VIDEO).long() * 2
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "mm_token_type_ids": types,
              "pixel_values_videos": media["pixel_values_videos"], "video_grid_thw": media["video_grid_thw"]}
    model = tiny_qwen_vl("2.5", patch=PATCH, attn_implementation="sdpa", seed=seed)
    grid = (h // QWEN_MERGE, w // QWEN_MERGE)
    step = max(1, len(frames) // t)
    rows, strips = [], []
    for method in ["none", "random", "pool", "hiprune"]:
        if method != "none":
            prune.wrap(model, method, keep=keep)
        with torch.no_grad():
            model(**inputs)
            prefill = _median_ms(lambda: model(**inputs))
        if method == "none":
            rows.append((method, n, n, prefill))
            continue
        rec = model.prune_state.last.images[0]
        rows.append((method, rec.tokens_before, rec.tokens_after, prefill))
        per = grid[0] * grid[1]
        tiles = [(f"{method} t={i}", overlay_kept(Image.fromarray(frames[min(i * step, len(frames) - 1)]),
                                                   rec.kept[i * per : (i + 1) * per], grid)) for i in range(t)]
        strips.extend(tiles)
        prune.unwrap(model)
    print(f"tiny random Qwen2.5-VL, {path}: {len(frames)} frames -> {t} x {grid[0]}x{grid[1]} = {n} tokens, keep={keep}")
    print(f"{'method':<9} {'tokens':>9} {'prefill ms':>11}")
    for method, before, after, prefill in rows:
        print(f"{method:<9} {f'{after}/{before}':>9} {prefill:>11.1f}")
    out = out_dir / "kept_video.png"
    labelled_grid(strips, columns=t).save(out)
    print(f"kept tokens per frame: {out}")
    return out


def _audio_strip(kept: torch.Tensor, window: torch.Tensor, cell: int = 4, height: int = 24) -> Image.Image:
    """A row of audio tokens (25 per second): kept ones bright, pruned dark, 2-second windows ticked."""
    n = kept.numel()
    img = Image.new("RGB", (max(1, n) * cell, height), (40, 40, 40))
    draw = ImageDraw.Draw(img)
    for i in range(n):
        if kept[i]:
            draw.rectangle((i * cell, 0, (i + 1) * cell - 1, height - 1), fill=(80, 200, 120))
        if i and window[i] != window[i - 1]:
            draw.line((i * cell, 0, i * cell, height - 1), fill=(255, 255, 255))
    return img


def run_omni_demo(path: str | Path, out_dir: str | Path = "prune-demo", keep: float = 0.25, seed: int = 0,
                  fps: float = 2.0, new_tokens: int = 8) -> Path:
    """Prune a video file *with its sound* on a small Qwen2.5-Omni thinker built in code.

    The frames (``fps`` per second) and the audio track interleave in 2-second chunks
    (``use_audio_in_video``); ``avpool`` budgets both in one pool, ``avpool`` with
    ``budget="per_modality"`` keeps ``keep`` of each, ``hiprune`` and ``random`` prune the video part
    only. Prints tokens kept per modality and timings; writes ``kept_omni.png`` (per method: one tile
    per temporal slice of 2 frames, then the audio tokens with the 2-second windows ticked).
    """
    from .._tiny import OMNI_AUDIO, OMNI_VIDEO, omni_process, tiny_omni_processor, tiny_omni_thinker
    from ..io import load_video

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frames, wave = load_video(path, fps=fps, audio=True)
    processor = tiny_omni_processor()
    text = "w10 w11 <|vision_bos|><|VIDEO|><|vision_eos|> w12 w13 w14"
    inputs = omni_process(processor, text, videos=[frames], audio=[wave], use_audio_in_video=True, fps=fps)
    t, h, w = inputs["video_grid_thw"][0].tolist()
    grid = (h // 2, w // 2)
    ids = inputs["input_ids"][0]
    video_pos, audio_pos = (ids == OMNI_VIDEO).nonzero()[:, 0], (ids == OMNI_AUDIO).nonzero()[:, 0]
    model = tiny_omni_thinker(attn_implementation="sdpa", seed=seed)
    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    runs = [("none", None, {}), ("avpool", "avpool", {}), ("avpool/modality", "avpool", {"budget": "per_modality"}),
            ("hiprune", "hiprune", {}), ("random", "random", {})]
    rows, tiles = [], []
    for label, method, options in runs:
        if method is not None:
            prune.wrap(model, method, keep=keep, **options)
        with torch.no_grad():
            model(**inputs)  # warm-up
            prefill = _median_ms(lambda: model(**inputs))
            answer = model.generate(**inputs, **gen)[0, ids.numel() :].tolist()
        if method is None:
            kept = torch.ones(ids.numel(), dtype=torch.bool)
        else:
            kept = model.prune_state.last.keep_mask[0].cpu()
            prune.unwrap(model)
        kv, ka = kept[video_pos], kept[audio_pos]
        rows.append((label, f"{int(kv.sum())}/{kv.numel()}", f"{int(ka.sum())}/{ka.numel()}", prefill, answer))
        per = grid[0] * grid[1]
        for i in range(t):
            frame = Image.fromarray(frames[min(2 * i, len(frames) - 1)])
            tiles.append((f"{label} t={i}", overlay_kept(frame, kv[i * per : (i + 1) * per], grid)))
        window = torch.arange(ka.numel()) // 50  # 25 audio tokens per second, 2-second windows
        tiles.append((f"{label} audio", _audio_strip(ka, window)))
    print(f"tiny random Qwen2.5-Omni thinker, {path}: {len(frames)} frames -> {t} x {grid[0]}x{grid[1]} video "
          f"tokens + {audio_pos.numel()} audio tokens (2-second chunks interleaved), keep={keep}")
    print(f"{'method':<16} {'video':>8} {'audio':>8} {'prefill ms':>11}  first tokens")
    for label, video, audio, prefill, answer in rows:
        print(f"{label:<16} {video:>8} {audio:>8} {prefill:>11.1f}  {answer[:6]}")
    out = out_dir / "kept_omni.png"
    labelled_grid(tiles, columns=t + 1).save(out)
    print(f"kept video tokens per frame and audio tokens: {out}")
    return out


PROXY_METHODS = ("random", "pool", "cls", "hiprune", "fastv", "transprune")


def run_proxy_demo(
    out_dir: str | Path = "prune-demo",
    keep: float | int = 0.11,
    seed: int = 0,
    *,
    cache: str | Path | None = None,
    device: str = "cpu",
    methods=PROXY_METHODS,
) -> Path:
    """Ask the real-weights proxy VLM a question about a generated scene, unpruned and with each method;
    print the answers and write ``proxy_kept.png``."""
    from .proxy import POST_PROMPT, load_proxy, prompt
    from .tasks import shapes

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = load_proxy(cache=cache, device=device)
    # a question from the training generator's distribution, on a scene no split uses
    doc = shapes.generate_docs(1, seed=10_000 + seed)[0]
    image = shapes.doc_to_visual(doc)[0]
    text = prompt(processor, doc["question"], post_prompt=POST_PROMPT)
    inputs = processor(images=[image], text=[text], return_tensors="pt").to(device)
    side = inputs["pixel_values"].shape[-1] // model.config.vision_config.patch_size

    def answer() -> tuple[str, float]:
        with torch.no_grad():
            t0 = time.perf_counter()
            out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
            ms = (time.perf_counter() - t0) * 1e3
        return processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip(), ms

    rows = [("none", side * side, *answer())]
    tiles = [(f"unpruned: {rows[0][2]}", image.resize((224, 224)))]
    skipped = []
    for method in methods:
        try:
            prune.wrap(model, method, keep=keep)
        except ValueError as err:  # e.g. an in-LLM method whose first cut comes too late for this keep
            skipped.append(f"{method}: {err}")
            continue
        try:
            text_out, ms = answer()
            last = model.prune_state.last
            rec = last.images[0]
            after = _tokens_seen(model, last, rec)
            rows.append((method, after, text_out, ms))
            tiles.append((f"{method} {after}: {text_out}", overlay_kept(image.resize((224, 224)), rec.kept, (side, side))))
        finally:
            prune.unwrap(model)

    print(f"proxy VLM (DINOv2 ViT-S/14 + SmolLM2-135M, real weights), keep={keep}")
    print(f"Q: {doc['question']}   (truth: {doc['answer']})")
    print(f"{'method':<11} {'tokens':>7} {'generate ms':>12}  answer")
    for method, tokens, text_out, ms in rows:
        mark = "ok" if shapes.exact_match(text_out, doc["answer"]) else "WRONG"
        print(f"{method:<11} {tokens:>7} {ms:>12.1f}  {text_out!r} {mark}")
    for note in skipped:
        print(f"skipped {note}")
    path = out_dir / "proxy_kept.png"
    labelled_grid(tiles, columns=4).save(path)
    print(f"kept patches: {path}")
    return path
