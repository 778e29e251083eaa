"""Pictures of what a method kept: the image with pruned patches dimmed."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw


def overlay_kept(
    image: Image.Image, kept: torch.Tensor, grid: tuple[int, int], *, dim: float = 0.25
) -> Image.Image:
    """The image with patches not in ``kept`` (bool (h*w,)) darkened and kept ones outlined."""
    h, w = grid
    image = image.convert("RGB")
    width, height = image.size
    dark = Image.blend(image, Image.new("RGB", image.size, (0, 0, 0)), 1.0 - dim)
    mask = Image.new("L", image.size, 0)
    draw = ImageDraw.Draw(mask)
    kept = kept.view(h, w).cpu()
    for r in range(h):
        for c in range(w):
            if kept[r, c]:
                box = (c * width // w, r * height // h, (c + 1) * width // w - 1, (r + 1) * height // h - 1)
                draw.rectangle(box, fill=255)
    out = Image.composite(image, dark, mask)
    return out


def labelled_grid(tiles: Sequence[tuple[str, Image.Image]], *, columns: int = 3, pad: int = 6) -> Image.Image:
    """Tiles side by side with a caption above each."""
    tw = max(t.size[0] for _, t in tiles)
    th = max(t.size[1] for _, t in tiles)
    caption = 16
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (tw + pad) + pad, rows * (th + caption + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (label, tile) in enumerate(tiles):
        x = pad + (i % columns) * (tw + pad)
        y = pad + (i // columns) * (th + caption + pad)
        draw.text((x, y), label, fill=(0, 0, 0))
        sheet.paste(tile, (x, y + caption))
    return sheet
