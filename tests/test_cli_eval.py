"""The prune CLI's evaluation commands: --help everywhere, clear one-line errors with exit code 2,
show writes the right picture, report renders."""

import json

import pytest
from PIL import Image, ImageStat

from prune.cli import main
from prune.evaluation.tasks import shapes

COMMANDS = ["methods", "demo", "proxy", "show", "bench", "eval", "report"]


def test_help_everywhere(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    top = capsys.readouterr().out
    for command in COMMANDS:
        assert command in top
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage: prune " + command in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["bench", "--model", "nope"], "unknown model 'nope'"),
        (["bench", "--model", "tiny-llava", "--methods", "random,bogus"], "unknown method(s) bogus"),
        (["bench", "--model", "tiny-llava", "--keep", "0"], "keep '0'"),
        (["bench", "--model", "tiny-llava", "--keep", "1.5"], "keep '1.5'"),
        (["bench", "--model", "tiny-llava", "--keep", "half"], "must be numbers"),
        (["bench", "--model", "tiny-llava", "--image-size", "0x3"], "image size"),
        (["bench", "--model", "tiny-llava", "--rounds", "0"], "positive integer"),
        (["show", "missing.png", "--model", "tiny-llava"], "missing.png is not a file"),
        (
            ["show", "{image}", "--model", "tiny-llava", "--method", "hiprune", "--option", "alpah=0.2"],
            "alpah",
        ),
        (["report", "{empty}"], "no prune bench/eval results"),
        (["report", "{empty}/nothing-here"], "does not exist"),
        (["eval", "--model", "{empty}", "--tasks", "prune_shapes"], "not a local model folder"),
        (["frobnicate"], "invalid choice"),
        (["eval", "--model", "tiny", "--methods", "random", "--option", "pdrop.layers=1"], "pdrop is not in --methods"),
        (["eval", "--model", "tiny", "--methods", "random", "--option", "alpha=0.2"], "no method of the sweep"),
    ],
)
def test_bad_input_gives_one_line_and_exit_code_2(argv, words, tmp_path, capsys):
    image = tmp_path / "img.png"
    shapes.render_scene(shapes.random_scene(0), size=(64, 64)).save(image)
    (tmp_path / "empty").mkdir()
    argv = [a.format(image=image, empty=tmp_path / "empty") for a in argv]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert words in err[-1] and "error:" in err[-1]
    assert not any(line.startswith("Traceback") for line in err)


def test_show_writes_the_view_with_kept_patches_bright(tmp_path, capsys):
    image = tmp_path / "scene.png"
    shapes.render_scene(shapes.random_scene(1), size=(200, 160)).save(image)
    out = tmp_path / "kept.png"
    assert main(["show", str(image), "--model", "tiny-llava", "--method", "random", "--keep", "0.25",
                 "--out", str(out), "--size", "336", "--device", "cpu"]) == 0  # fmt: skip
    assert "kept 16/64 tokens" in capsys.readouterr().out
    picture = Image.open(out).convert("L")
    assert picture.size == (336, 336)
    # 8 x 8 cells of 42 px: 16 kept cells keep their brightness, the others are dimmed to a quarter
    cells = [picture.crop((c * 42, r * 42, c * 42 + 42, r * 42 + 42)) for r in range(8) for c in range(8)]
    means = sorted(ImageStat.Stat(cell).mean[0] for cell in cells)
    assert means[47] < 0.5 * means[48]  # a clear gap between the 48 dimmed and the 16 kept cells


def test_show_video_gives_a_strip_of_frames(tmp_path):
    from prune.evaluation.show import show

    frames = [shapes.render_scene(shapes.random_scene(i), size=(112, 112)) for i in range(4)]
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    path, record = show(gif, "tiny-qwen2.5-vl", "random", 0.5, tmp_path / "strip.png", size=120, frames=4)
    assert record.modality == "video" and len(record.grids) == 2  # 4 frames, temporal patches of 2
    assert record.tokens_after == record.tokens_before // 2
    assert Image.open(path).size == (2 * 120 + 4, 120)


def _eval_result(path, method, keep, value, after):
    rows = [{"method": method, "keep": keep, "task": "prune_shapes", "metric": "exact_match", "value": value,
             "stderr": None, "samples": 4, "vision_tokens_before": 64.0, "vision_tokens_after": after,
             "keep_ratio": after / 64, "prefill_ms": 3.0}]  # fmt: skip
    path.mkdir(parents=True, exist_ok=True)
    data = {"schema": "prune.eval/1", "created": "x", "model": {"path": "m", "base": "llava_hf"},
            "settings": {}, "rows": rows}  # fmt: skip
    (path / "eval.json").write_text(json.dumps(data))


def test_report_merges_bench_and_eval(tmp_path, capsys):
    bench_dir = tmp_path / "bench"
    assert main(["bench", "--model", "tiny-llava", "--methods", "random", "--keep", "0.5", "--device", "cpu",
                 "--warmup", "0", "--rounds", "2", "--new-tokens", "2", "--prompt-tokens", "8",
                 "--out", str(bench_dir), "--no-progress"]) == 0  # fmt: skip
    _eval_result(tmp_path / "eval_a", "none", 1.0, 0.75, 64.0)
    _eval_result(tmp_path / "eval_b", "random", 0.25, 0.5, 16.0)
    out = tmp_path / "report"
    assert (
        main(
            ["report", str(bench_dir), str(tmp_path / "eval_a"), str(tmp_path / "eval_b"), "--out", str(out)]
        )
        == 0
    )
    text = (out / "report.md").read_text()
    assert "## Speed" in text and "## Accuracy" in text
    assert "| random | 0.5 | 32/64 |" in text  # bench row
    assert (
        "| none | 1.0 | 0.750 |" in text and "| random | 0.25 | 0.500 |" in text
    )  # eval rows, unpruned first
    for line in text.splitlines():  # every picture the report links is in its folder
        if line.startswith("!["):
            assert (out / line[line.index("(") + 1 : -1]).is_file()
    if pytest.importorskip("matplotlib"):
        assert "![accuracy vs keep](accuracy_vs_keep.png)" in text


def test_show_views_of_anyres_records_map_every_kept_token():
    """LLaVA-NeXT / OneVision records map tokens to views, so `prune show` can draw their crops."""
    import torch
    from PIL import Image

    import prune
    from prune.evaluation.show import _views
    from tests.conftest import Case

    case = Case("llava_next", prompts=((3,),))
    inputs = case.inputs()
    model = prune.wrap(case.model, "hiprune", keep=0.3)
    with torch.no_grad():
        model(**inputs)
    record = model.prune_state.last.images[0]
    newline = record.token_view < 0
    from transformers import CLIPImageProcessor

    views = _views(record, [Image.new("RGB", (32, 30))], {"pixel_values": inputs["pixel_values"]},
                   CLIPImageProcessor())
    assert len(views) == len(record.grids) > 1
    assert sum(int(mask.sum()) for _, mask, _ in views) == int(record.kept[~newline].sum()) == record.budget
    assert all(mask.numel() == h * w for _, mask, (h, w) in views)


@pytest.mark.parametrize("family", sorted(__import__("prune.cli", fromlist=["HIPRUNE_LAYERS"]).HIPRUNE_LAYERS))
def test_methods_states_hiprune_layers_of_each_family_encoder(family, capsys):
    """The layers `prune methods` states are hiprune's own choice on the family's real-size shape."""
    import torch
    import transformers

    import prune
    from prune.cli import HIPRUNE_LAYERS
    from prune.evaluation import models as M
    from prune.hooks import adapter_for
    from prune.methods import get_method

    shape, _, obj, deep = HIPRUNE_LAYERS[family]
    spec = M.resolve_model(shape)
    if not hasattr(transformers, spec.architecture):
        pytest.skip(f"no {spec.architecture} in this transformers")
    with torch.device("meta"):
        adapter = adapter_for(M._model_class(spec)(M.build_config(spec)))
    assert adapter.family == family
    _, options = prune.PruneConfig(method="hiprune").resolved(family)
    assert get_method("hiprune")(**options).layers(adapter.encoder_info()) == (obj, deep)
    assert main(["methods"]) == 0
    assert f"layers on {family} ({shape}, " in capsys.readouterr().out
