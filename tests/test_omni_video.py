"""Qwen2.5-Omni on a real file: a short clip with an audio track written here with PyAV, read by
prune.io.load_video(audio=True), turned into thinker inputs by the Omni processor (built offline)."""

import numpy as np
import pytest
import torch

import prune
from prune._tiny import omni_item_tokens, omni_process, tiny_omni_processor, tiny_omni_thinker
from tests.media import write_clip
from tests.oracle import omni_full_inputs, run_reduced_omni

pytest.importorskip("av")
pytest.importorskip("decord")

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """3 s at 8 fps, 64x48: one colour per second; audio: 1 s silence then a 440 Hz tone (16 kHz)."""
    frames = []
    for i in range(24):
        frame = np.zeros((48, 64, 3), np.uint8)
        frame[:] = COLOURS[i // 8]
        frame[8:20, 8 + 4 * (i % 8) : 20 + 4 * (i % 8)] = 255  # a moving white square
        frames.append(frame)
    t = np.arange(48000) / 16000
    tone = np.where(t >= 1.0, 0.5 * np.sin(2 * np.pi * 440 * t), 0.0)
    return write_clip(tmp_path_factory.mktemp("omni") / "clip.mp4", frames, audio=tone)


@pytest.fixture(scope="module")
def inputs(clip):
    from prune.io import load_video

    frames, wave = load_video(clip, fps=2, audio=True)
    assert frames.shape[0] == 6 and abs(wave.shape[0] - 48000) < 2048
    text = "w10 w11 <|vision_bos|><|VIDEO|><|vision_eos|> w12 w13 w14"
    return omni_process(tiny_omni_processor(), text, videos=[frames], audio=[wave], use_audio_in_video=True)


def test_processor_layout_is_the_one_the_adapter_reads(inputs):
    grid = tuple(inputs["video_grid_thw"][0].tolist())
    frames = int(inputs["feature_attention_mask"][0].sum())
    assert float(inputs["video_second_per_grid"][0]) == 1.0  # 2 frames per slice at 2 fps
    expected = [10, 11] + omni_item_tokens(("video+audio", grid, 1.0, frames)) + [12, 13, 14]
    assert inputs["input_ids"][0].tolist() == expected


def test_avpool_on_a_clip_with_sound(inputs):
    model = prune.wrap(tiny_omni_thinker(), "avpool", keep=0.2)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        record = model.prune_state.last
        generated = model.generate(**inputs, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    video, audio = (next(im for im in record.images if im.modality == m) for m in ("video", "audio"))
    assert video.pool == audio.pool
    n = video.tokens_before + audio.tokens_before
    assert video.tokens_after + audio.tokens_after == round(0.2 * n)
    assert set(video.window.tolist()) == set(audio.window.tolist()) == {0, 1}  # 3 s: two 2-second chunks
    for im in (video, audio):
        for w in (0, 1):
            assert im.kept[im.window == w].any()  # the per-window floor
    keep = record.keep_mask[0]
    prune.unwrap(model)
    embeds, positions = omni_full_inputs(model, inputs)
    assert torch.equal(record.position_ids[-3:, 0], positions[:, 0, keep])
    ref_logits, ref_tokens = run_reduced_omni(model, embeds[0][keep], positions[:, 0, keep])
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    assert generated[0, inputs["input_ids"].shape[1] :].tolist() == ref_tokens


def test_omni_demo(clip, tmp_path, capsys):
    from prune.evaluation.demo import run_omni_demo

    out = run_omni_demo(clip, out_dir=tmp_path, keep=0.25, new_tokens=2)
    assert out.is_file() and out.stat().st_size > 0
    text = capsys.readouterr().out
    for label in ("none", "avpool", "avpool/modality", "hiprune", "random"):
        assert f"\n{label} " in text
