"""prune.io.load_video on a real file written here with PyAV (frames and an audio track)."""

import numpy as np
import pytest

from prune.io import frame_indices, load_video
from tests.media import write_clip

pytest.importorskip("av")
pytest.importorskip("decord")

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """2 s at 8 fps: frames cycle through 4 colours in blocks of 4; a 440 Hz tone at 16 kHz."""
    frames = [np.full((48, 64, 3), COLOURS[(i // 4) % 4], np.uint8) for i in range(16)]
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(32000) / 16000)
    return write_clip(tmp_path_factory.mktemp("video") / "clip.mp4", frames, audio=tone)


def test_num_frames_spread_over_clip(clip):
    frames = load_video(clip, num_frames=4)
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    # frames 0, 5, 10, 15 -> colour blocks 0, 1, 2, 3
    for frame, colour in zip(frames, COLOURS):
        assert np.abs(frame.reshape(-1, 3).mean(0) - colour).max() < 30


def test_fps_sampling(clip):
    frames = load_video(clip, fps=2)
    assert frames.shape[0] == 4  # 2 s at 2 fps


def test_audio_track(clip):
    frames, wave = load_video(clip, num_frames=2, audio=True, sample_rate=16000)
    assert frames.shape[0] == 2
    assert wave.dtype == np.float32 and abs(wave.shape[0] - 32000) < 2048
    spectrum = np.abs(np.fft.rfft(wave[2000:18000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 440) < 5  # the 440 Hz tone survives


def test_bad_arguments(tmp_path, clip):
    with pytest.raises(ValueError, match="exactly one"):
        load_video(clip)
    with pytest.raises(ValueError, match="exactly one"):
        load_video(clip, num_frames=2, fps=1)
    with pytest.raises(FileNotFoundError):
        load_video(tmp_path / "missing.mp4", num_frames=2)
    assert frame_indices(10, 10.0, 20, None).tolist() == list(range(10))
