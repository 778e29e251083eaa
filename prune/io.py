"""Reading media files into the arrays processors accept."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _decord():
    try:
        import decord
    except ImportError:
        raise ImportError('prune.io.load_video needs decord: pip install "vlm-prune[video]"') from None
    return decord


def frame_indices(total: int, avg_fps: float, num_frames: int | None, fps: float | None) -> np.ndarray:
    """Frame numbers to decode: ``num_frames`` spread evenly over the clip, or one every 1/``fps`` s."""
    if (num_frames is None) == (fps is None):
        raise ValueError("pass exactly one of num_frames or fps")
    if total <= 0:
        raise ValueError("the video has no frames")
    if num_frames is not None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        return np.linspace(0, total - 1, num=min(num_frames, total)).round().astype(np.int64)
    if fps <= 0:
        raise ValueError(f"fps must be > 0, got {fps}")
    step = max(avg_fps / fps, 1.0)
    return np.arange(0, total, step).astype(np.int64)


def load_video(
    path: str | Path,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    audio: bool = False,
    sample_rate: int = 16000,
):
    """Decode a video file with decord (extra ``video``).

    Args:
        path: a video file.
        num_frames: frames spread evenly over the clip; or
        fps: frames per second to sample (exactly one of the two).
        audio: also return the audio track.
        sample_rate: audio sample rate in Hz (Whisper-style encoders use 16000).

    Returns:
        frames: (T, H, W, 3) uint8 array, what video processors accept; with ``audio=True`` a tuple
        ``(frames, waveform)`` where waveform is a (samples,) float32 mono array at ``sample_rate``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no video file at {path}")
    decord = _decord()
    reader = decord.VideoReader(str(path), ctx=decord.cpu(0))
    indices = frame_indices(len(reader), float(reader.get_avg_fps()), num_frames, fps)
    frames = reader.get_batch(list(indices)).asnumpy()
    if not audio:
        return frames
    try:
        track = decord.AudioReader(str(path), ctx=decord.cpu(0), sample_rate=sample_rate, mono=True)
    except Exception as err:  # decord raises its own error type for files without audio
        raise ValueError(f"{path} has no readable audio track ({err})") from None
    waveform = track[:].asnumpy().reshape(-1).astype(np.float32)
    return frames, waveform
