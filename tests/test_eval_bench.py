"""prune bench on CPU with tiny shapes: numbers present, pruning visible, JSON schema stable."""

import json

import pytest
import torch

from prune.cli import main
from prune.evaluation import bench

# The schema is an interface (reports and users read it): changing it must be deliberate.
TOP_KEYS = {"schema", "created", "model", "environment", "settings", "rows"}
ROW_KEYS = [
    "method", "keep", "status", "vision_tokens_before", "vision_tokens_after", "keep_ratio", "seq_len",
    "kv_tokens", "vision_ms", "prefill_ms", "ttft_ms", "decode_tok_s", "peak_mem_mb", "kv_cache_mb",
    "vision_gflops", "prefill_gflops", "ideal_prefill_ms", "ideal_decode_tok_s", "overhead_ms", "prefill_speedup",
]  # fmt: skip
CPU_NONE = {"peak_mem_mb"}  # CUDA only


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(
        [
            "bench", "--model", "tiny-llava", "--methods", "random,hiprune", "--keep", "1,0.25",
            "--device", "cpu", "--warmup", "0", "--repeats", "1", "--new-tokens", "3",
            "--prompt-tokens", "16", "--out", str(out), "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    return out


def _result(bench_dir):
    (path,) = bench_dir.glob("bench_tiny-llava_*.json")
    return json.loads(path.read_text())


def test_bench_json_schema_is_stable(bench_dir):
    result = _result(bench_dir)
    assert set(result) == TOP_KEYS
    assert result["schema"] == "prune.bench/1" == bench.SCHEMA
    assert list(bench.ROW_FIELDS) == ROW_KEYS
    assert [list(r) for r in result["rows"]] == [ROW_KEYS] * len(result["rows"])
    assert [(r["method"], r["keep"]) for r in result["rows"]] == [
        ("none", 1.0), ("random", 1.0), ("random", 0.25), ("hiprune", 1.0), ("hiprune", 0.25)
    ]  # fmt: skip
    assert result["settings"]["image_size"] == [64, 64] and result["settings"]["batch"] == 1
    assert result["model"]["architecture"] == "LlavaForConditionalGeneration"


def test_bench_numbers_are_present_and_show_the_pruning(bench_dir):
    rows = {(r["method"], r["keep"]): r for r in _result(bench_dir)["rows"]}
    for row in rows.values():
        assert row["status"] == "ok"
        for key in ROW_KEYS[3:]:
            if key not in CPU_NONE:
                assert row[key] is not None, key
        assert row["prefill_ms"] > 0 and row["ttft_ms"] > 0 and row["decode_tok_s"] > 0
    none = rows[("none", 1.0)]
    assert (none["vision_tokens_before"], none["vision_tokens_after"]) == (64, 64)
    for method in ("random", "hiprune"):
        full, cut = rows[(method, 1.0)], rows[(method, 0.25)]
        assert full["kv_tokens"] == none["kv_tokens"] == none["seq_len"]
        assert (cut["vision_tokens_before"], cut["vision_tokens_after"], cut["keep_ratio"]) == (64, 16, 0.25)
        assert cut["kv_tokens"] == none["kv_tokens"] - 48  # the cache holds only kept rows
        assert cut["kv_cache_mb"] < full["kv_cache_mb"]
        assert cut["prefill_gflops"] < full["prefill_gflops"]  # fewer rows through the language model
        # the encoder sees every patch; a pruned row also computes the attention statistics of its
        # tapped layers (2 of this tiny encoder's 4), which keep=1.0 skips
        assert cut["vision_gflops"] == pytest.approx(full["vision_gflops"], rel=0.15)


def test_bench_markdown_and_png(bench_dir):
    (md,) = bench_dir.glob("bench_tiny-llava_*.md")
    text = md.read_text()
    assert "| method | keep | vision tokens |" in text and "| random | 0.25 | 16/64 |" in text
    pngs = list(bench_dir.glob("bench_tiny-llava_*.png"))
    if pytest.importorskip("matplotlib"):
        assert len(pngs) == 1 and pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({pngs[0].name})" in text


def test_unsupported_method_keeps_its_row_with_the_reason(tmp_path):
    # cls needs a [CLS] token; the Qwen2.5-VL encoder has none
    code = main(
        [
            "bench", "--model", "tiny-qwen2.5-vl", "--methods", "cls", "--keep", "0.5", "--device", "cpu",
            "--warmup", "0", "--repeats", "1", "--new-tokens", "2", "--prompt-tokens", "8", "--out", str(tmp_path),
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    (path,) = tmp_path.glob("*.json")
    rows = json.loads(path.read_text())["rows"]
    assert rows[0]["method"] == "none" and rows[0]["status"] == "ok" and rows[0]["vision_tokens_before"] == 16
    assert (
        rows[1]["method"] == "cls"
        and rows[1]["status"].startswith("unsupported:")
        and "CLS" in rows[1]["status"]
    )
    assert rows[1]["prefill_ms"] is None


def test_cache_bytes_counts_keys_and_values():
    from transformers import DynamicCache

    cache = DynamicCache()
    k = torch.zeros(1, 2, 5, 8)
    cache.update(k.clone(), k.clone(), 0)
    cache.update(k.clone(), k.clone(), 1)
    assert bench.cache_bytes(cache) == 4 * k.numel() * 4
    assert bench.cache_length(cache) == 5


@pytest.mark.parametrize("kv_heads", [8, 2])
def test_attention_flops_are_counted_with_grouped_query_attention(kv_heads):
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    q, kv = torch.randn(2, 8, 16, 32), torch.randn(2, kv_heads, 20, 32)
    with FlopCounterMode(display=False, custom_mapping=bench._gqa_mapping()) as counter:
        F.scaled_dot_product_attention(q, kv, kv, enable_gqa=True)
    assert counter.get_total_flops() == 2 * (2 * 2 * 8 * 16 * 20 * 32)  # QK^T and PV, every query head


def test_decode_rate_comes_from_step_timestamps():
    steps = bench._Steps(cuda=False)
    steps.times = [0.0, 1.0, 1.5, 2.0, 2.5]  # prompt, first token, three decode steps of 0.5 s
    assert steps.rate(batch=4) == pytest.approx(4 * 3 / 1.5)
    steps.times = [0.0, 1.0]
    assert steps.rate(batch=1) is None
