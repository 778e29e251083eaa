"""The lmms-eval bridge: a real `python -m lmms_eval --model pruned` run on a tiny checkpoint and a
shipped offline task, the in-process `prune eval` sweep, argument routing."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")
pytest.importorskip("decord")  # lmms-eval's llava_hf imports it

from prune.evaluation import lmms_plugin  # noqa: E402
from prune.evaluation.tasks import TASKS_DIR  # noqa: E402
from prune.evaluation.tiny_checkpoint import save_tiny_llava  # noqa: E402

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("ckpt") / "tiny-llava")


def test_entry_point_registers_pruned():
    from lmms_eval.models import get_model

    assert get_model("pruned") is lmms_plugin.PrunedChat
    assert get_model("pruned", force_simple=True) is lmms_plugin.PrunedSimple


def test_lmms_eval_cli_runs_a_pruned_model_offline(checkpoint, tmp_path):
    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "lmms_eval", "--model", "pruned",
        "--model_args", f"base=llava_hf,pretrained={checkpoint},method=random,keep=0.25,seed=3,dtype=float32,device_map=cpu",
        "--tasks", "prune_shapes", "--include_path", str(TASKS_DIR), "--limit", "3",
        "--device", "cpu", "--batch_size", "1", "--output_path", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=OFFLINE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = out.rglob("*_results.json")
    results = json.loads(path.read_text())
    accuracy = results["results"]["prune_shapes"]["exact_match,none"]
    assert 0.0 <= accuracy <= 1.0
    assert results["n-samples"]["prune_shapes"]["effective"] == 3
    stats = results["throughput"]
    assert stats["avg_prune_prompts"] == 3
    assert stats["avg_prune_vision_tokens_before"] == 64  # 8 x 8 patches
    assert stats["avg_prune_vision_tokens_after"] == 16  # keep=0.25
    assert stats["avg_prune_keep_ratio"] == 0.25
    assert stats["avg_prune_prefill_ms"] > 0
    assert results["config"]["model_backend"].startswith("prune.evaluation.lmms_plugin.PrunedLlavaHf")


def test_prune_eval_sweeps_methods_and_keeps(checkpoint, tmp_path, capsys):
    from prune.cli import main

    out = tmp_path / "sweep"
    code = main(["eval", "--model", str(checkpoint), "--tasks", "prune_shapes", "--methods", "random,hiprune",
                 "--keep", "1,0.5", "--limit", "2", "--device", "cpu", "--dtype", "float32", "--out", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["schema"] == "prune.eval/1" and result["model"]["base"] == "llava_hf"
    rows = {(r["method"], r["keep"]): r for r in result["rows"]}
    assert set(rows) == {("none", 1.0), ("random", 0.5), ("hiprune", 0.5)}  # keep 1 once, unpruned
    for (method, _), row in rows.items():
        assert row["task"] == "prune_shapes" and row["metric"] == "exact_match" and 0 <= row["value"] <= 1
        assert row["vision_tokens_before"] == 64 and row["samples"] == 2
        assert row["vision_tokens_after"] == (64 if method == "none" else 32)
    table = (out / "eval.md").read_text()
    assert "| method | keep | prune_shapes exact_match | vision tokens | prefill ms |" in table
    assert table.index("| none | 1.0 |") < table.index("| hiprune | 0.5 |") < table.index("| random | 0.5 |")
    assert "| random | 0.5 | " in table and " | 32.0/64.0 | " in table
    assert sorted(p.name for p in (out / "lmms").glob("*.json")) == [
        "hiprune_keep0.5.json", "none_keep1.0.json", "random_keep0.5.json"
    ]  # fmt: skip


def test_prune_eval_skips_points_the_model_cannot_run_and_keeps_partial_results(checkpoint, tmp_path):
    from prune.cli import main

    out = tmp_path / "sweep"
    # fastv cuts after layer 2: the tiny checkpoint has 2 decoder layers, so every fastv point is refused
    code = main(["eval", "--model", str(checkpoint), "--tasks", "prune_shapes", "--methods", "fastv,random",
                 "--keep", "0.5", "--limit", "2", "--device", "cpu", "--dtype", "float32", "--out", str(out),
                 "--no-progress"])  # fmt: skip
    assert code == 0
    result = json.loads((out / "eval.json").read_text())
    assert {(r["method"], r["keep"]) for r in result["rows"]} == {("none", 1.0), ("random", 0.5)}
    (skip,) = result["skipped"]
    assert skip["method"] == "fastv" and skip["keep"] == 0.5 and "layer=2" in skip["reason"]
    assert "skipped fastv at keep 0.5" in (out / "eval.md").read_text()
    partial = json.loads((out / "eval.partial.json").read_text())
    assert partial["rows"] == result["rows"] and partial["skipped"] == result["skipped"]


def test_prune_eval_passes_method_options_and_labels_their_rows(checkpoint, tmp_path):
    from prune.cli import main

    out = tmp_path / "sweep"
    code = main(["eval", "--model", str(checkpoint), "--tasks", "prune_shapes", "--methods", "random,hiprune",
                 "--option", "random.seed=7", "--option", "alpha=0.5", "--keep", "0.5", "--limit", "2",
                 "--device", "cpu", "--dtype", "float32", "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert {r["method"] for r in rows} == {"none", "random (seed=7)", "hiprune (alpha=0.5)"}
    assert all(r["vision_tokens_after"] == 32 for r in rows if r["method"] != "none")


def test_prune_eval_refuses_unknown_tasks(checkpoint, capsys):
    from prune.cli import main

    assert main(["eval", "--model", str(checkpoint), "--tasks", "prune_shapez", "--device", "cpu"]) == 2
    assert "unknown lmms-eval task(s): 'prune_shapez' (did you mean prune_shapes" in capsys.readouterr().err


def test_model_args_route_to_prune_and_base():
    base, config, rest = lmms_plugin.split_model_args(
        {
            "base": "llava_hf",
            "pretrained": "/m",
            "method": "hiprune",
            "keep": 0.25,
            "alpha": 0.2,
            "device_map": "cpu",
        }
    )
    assert base == "llava_hf" and rest == {"pretrained": "/m", "device_map": "cpu"}
    assert (config.method, config.keep, config.options) == ("hiprune", 0.25, {"alpha": 0.2})
    _, config, rest = lmms_plugin.split_model_args({"base": "x", "method": "random", "seed": 1})
    assert config.options == {"seed": 1} and rest == {}  # a method option's name goes to prune
    _, config, rest = lmms_plugin.split_model_args(
        {"base": "x", "method": "random", "prune_seed": 5, "seed": 1}
    )
    assert config.options == {"seed": 5} and rest == {"seed": 1}  # unless prune_<name> says it is the base's
    _, config, rest = lmms_plugin.split_model_args({"base": "x", "method": "none", "pretrained": "/m"})
    assert config is None and rest == {"pretrained": "/m"}
    with pytest.raises(ValueError, match="needs base="):
        lmms_plugin.split_model_args({"pretrained": "/m"})
    with pytest.raises(ValueError, match="unknown method"):
        lmms_plugin.split_model_args({"base": "x", "method": "nope"})
    with pytest.raises(ValueError, match="keep"):
        lmms_plugin.split_model_args({"base": "x", "method": "random", "keep": 0})
