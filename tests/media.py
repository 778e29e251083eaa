"""Media files the tests write themselves (no downloads)."""

from pathlib import Path

import numpy as np


def write_clip(path: Path, frames: list[np.ndarray], *, fps: int = 8, audio: np.ndarray | None = None,
               sample_rate: int = 16000) -> Path:
    """An MPEG-4 video of ``frames`` ((H, W, 3) uint8 each) at ``fps``, with an AAC mono track of
    ``audio`` (float32 samples at ``sample_rate``) when given."""
    import av

    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        video = container.add_stream("mpeg4", rate=fps)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        streams = [video]
        if audio is not None:
            sound = container.add_stream("aac", rate=sample_rate)
            sound.layout = "mono"
            streams.append(sound)
        for frame in frames:
            for packet in video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        if audio is not None:
            audio = audio.astype(np.float32)
            for start in range(0, audio.shape[0], 1024):
                chunk = av.AudioFrame.from_ndarray(audio[None, start : start + 1024], format="fltp", layout="mono")
                chunk.sample_rate = sample_rate
                for packet in sound.encode(chunk):
                    container.mux(packet)
        for stream in streams:
            for packet in stream.encode(None):
                container.mux(packet)
    return path
