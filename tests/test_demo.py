"""`prune demo` (image and video) runs offline and writes its pictures."""

import numpy as np
import pytest
from PIL import Image

from prune.cli import main


def test_image_demo_writes_png(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--keep", "0.25"]) == 0
    out = capsys.readouterr().out
    for method in ("random", "pool", "cls", "hiprune"):
        assert f"{method}" in out and "144/576" in out
    # keep=0.25 is the 8-layer LM's floor for the in-LLM methods (their last layers would see nothing)
    for method in ("fastv", "pdrop", "transprune"):
        line = next(row for row in out.splitlines() if row.startswith(f"{method}@0.4 "))
        seen, total = line.split()[1].split("/")
        assert 0.25 * 576 < int(seen) < int(total)
    image = Image.open(tmp_path / "kept.png")
    assert image.size[0] > 336 * 2 and image.size[1] > 336


def test_video_demo_and_bad_path(tmp_path, capsys):
    pytest.importorskip("av")
    pytest.importorskip("decord")
    from tests.media import write_clip

    path = write_clip(tmp_path / "clip.mp4", [np.full((84, 112, 3), 20 * i, np.uint8) for i in range(8)])
    assert main(["demo", "--video", str(path), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "kept_video.png").is_file()
    assert "hiprune" in capsys.readouterr().out
    assert main(["demo", "--video", str(tmp_path / "missing.mp4")]) == 2
    assert "no video file" in capsys.readouterr().err
