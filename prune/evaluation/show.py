"""`prune show`: the image a model saw with the patches a method kept highlighted (pruned ones dimmed);
for a video, a strip of its frames (one per temporal patch group).

Each view of the record (an image, an anyres crop, a frame) becomes one tile: the record maps every
token to its view and patch, so LLaVA-NeXT's crops (unpadded patches stay dark) and OneVision's crop
grid are drawn too; newline tokens are not patches and are not drawn.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image

import prune

from . import models as M
from .visualize import overlay_kept

VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".gif"}


class ShowError(ValueError):
    """Bad input to prune show (the CLI turns it into exit code 2)."""


def read_frames(path: Path, frames: int) -> list[Image.Image]:
    """``frames`` frames sampled uniformly (GIF through Pillow, other videos through decord)."""
    if path.suffix.lower() == ".gif":
        from PIL import ImageSequence

        with Image.open(path) as gif:
            every = [f.convert("RGB") for f in ImageSequence.Iterator(gif)]
        index = [round(i * (len(every) - 1) / max(frames - 1, 1)) for i in range(min(frames, len(every)))]
        return [every[i] for i in index]
    try:
        import decord
    except ImportError:
        raise ShowError("reading videos needs decord: pip install decord") from None
    reader = decord.VideoReader(str(path))
    total = len(reader)
    index = [round(i * (total - 1) / max(frames - 1, 1)) for i in range(min(frames, total))]
    return [Image.fromarray(a) for a in reader.get_batch(index).asnumpy()]


def _view_of_pixels(pixel_values: torch.Tensor, processor) -> Image.Image:
    """The normalized (3, H, W) view a processor produced, back as an image."""
    mean = torch.tensor(processor.image_mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(processor.image_std, dtype=torch.float32).view(3, 1, 1)
    x = (pixel_values.float().cpu() * std + mean).clamp(0, 1)
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))


def _views(
    record, images: list[Image.Image], inputs: dict[str, torch.Tensor], processor
) -> list[tuple[Image.Image, torch.Tensor, tuple[int, int]]]:
    grids = list(record.grids)
    if record.token_view is not None:
        masks = record.view_masks()
    elif record.kept.numel() == sum(h * w for h, w in grids):
        masks = list(record.kept.cpu().split([h * w for h, w in grids]))
    else:
        raise ShowError(f"prune show cannot map these {record.kept.numel()} tokens to the views {grids}")
    out = []
    pixels = inputs.get("pixel_values")
    if pixels is not None and pixels.dim() == 5:  # anyres: (images, views, 3, H, W)
        pixels = pixels[0]
    # the processor's own pixels of each view, when views and pixel crops correspond (LLaVA-1.5, NeXT)
    exact = pixels is not None and pixels.dim() == 4 and len(images) == 1 and pixels.shape[0] >= len(grids)
    exact = exact and all(h == w for h, w in grids) and len(grids) in (1, pixels.shape[0])
    for v, (h, w) in enumerate(grids):
        part = masks[v]
        if exact:
            view = _view_of_pixels(pixels[v], processor)
        else:  # flattened patches (Qwen): the input resized to the processor's patch grid
            frame = images[min(v * len(images) // len(grids), len(images) - 1)]
            grid = inputs.get("video_grid_thw" if len(images) > 1 else "image_grid_thw")
            patch = int(getattr(processor, "patch_size", 14) or 14)
            if grid is not None:
                _, gh, gw = (int(x) for x in grid[0].tolist())
                frame = frame.resize((gw * patch, gh * patch))
            view = frame
        out.append((view, part, (h, w)))
    return out


def show(
    source: Path,
    model_name: str,
    method: str,
    keep: float | int,
    out: Path,
    *,
    size: int = 336,
    frames: int = 8,
    device: str = "cpu",
    options: dict[str, Any] | None = None,
) -> tuple[Path, Any]:
    """Write the PNG; returns (path, the image's prune record)."""
    if not source.is_file():
        raise ShowError(f"{source} is not a file")
    spec = M.resolve_model(model_name)
    video = source.suffix.lower() in VIDEO_SUFFIXES
    if video:
        images = read_frames(source, frames)
    else:
        try:
            images = [Image.open(source).convert("RGB")]
        except OSError as exc:
            raise ShowError(f"cannot read {source} as an image ({exc})") from None
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = M.build_model(spec, device=device, dtype=dtype, attn_implementation="sdpa")
    processor = M.build_image_processor(spec)
    if video:
        inputs = M.make_video_inputs(model, spec, images, device=device, dtype=dtype)
    else:
        inputs = M.make_inputs(
            model, processor, images, device=device, dtype=dtype, spec=spec, prompt_tokens=8
        )
    prune.wrap(model, method, keep=keep, **(options or {}))
    with torch.no_grad():
        model(**inputs)
    record = model.prune_state.last.images[0]
    tiles = []
    for view, kept, grid in _views(record, images, inputs, processor):
        tile = overlay_kept(view, kept, grid)
        scale = size / max(tile.size)
        tiles.append(
            tile.resize(
                (max(1, round(tile.width * scale)), max(1, round(tile.height * scale))), Image.NEAREST
            )
        )
    gap = 4 if len(tiles) > 1 else 0
    sheet = Image.new(
        "RGB",
        (sum(t.width for t in tiles) + gap * (len(tiles) - 1), max(t.height for t in tiles)),
        (255, 255, 255),
    )
    x = 0
    for tile in tiles:
        sheet.paste(tile, (x, 0))
        x += tile.width + gap
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out, record
