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
    "kv_tokens", "vision_ms", "prefill_ms", "prefill_median_ms", "prefill_spread", "host_ms", "ttft_ms",
    "ttft_median_ms", "decode_tok_s", "decode_median_tok_s", "peak_mem_mb", "kv_cache_mb", "vision_gflops",
    "prefill_gflops", "ideal", "ideal_prefill_ms", "ideal_decode_tok_s", "overhead_ms", "prefill_speedup",
    "ideal_speedup", "ratio_to_ideal",
]  # fmt: skip
CPU_NONE = {"peak_mem_mb"}  # CUDA only


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(
        [
            "bench", "--model", "tiny-llava", "--methods", "random,hiprune", "--keep", "1,0.25",
            "--device", "cpu", "--warmup", "0", "--rounds", "2", "--new-tokens", "3",
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
    assert result["schema"] == "prune.bench/2" == bench.SCHEMA
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
            "--warmup", "0", "--rounds", "2", "--new-tokens", "2", "--prompt-tokens", "8", "--out", str(tmp_path),
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


class _FakeConfig:
    def __init__(self, name, log, oom_at=None):
        self.name, self.log, self.oom_at = name, log, oom_at
        self.samples = bench._Samples()
        self.row = {"status": "ok"}
        self.calls = 0
        self.entered = 0

    def enter(self):
        self.entered += 1

    def exit(self):
        self.entered -= 1

    def measure(self, samples):
        self.calls += 1
        if self.calls == self.oom_at:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")
        self.log.append(self.name)
        samples.add("prefill_ms", float(self.calls))


def test_round_robin_measures_every_configuration_once_per_round_in_rotating_order():
    log = []
    configs = [_FakeConfig(n, log) for n in "abc"]
    settings = bench.BenchSettings(warmup=2, rounds=3, device="cpu")
    bench._round_robin(configs, settings, progress=False, log=print)
    rounds = [log[i : i + 3] for i in range(0, len(log), 3)]
    assert len(rounds) == 5 and all(sorted(r) == ["a", "b", "c"] for r in rounds)
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b"]  # the first in line rotates
    for cfg in configs:  # warm-up rounds are not recorded; every round is unwrapped again
        assert cfg.samples.values["prefill_ms"] == [3.0, 4.0, 5.0] and cfg.entered == 0
        assert cfg.samples.low("prefill_ms") == 3.0 and cfg.samples.median("prefill_ms") == 4.0
        assert cfg.samples.spread("prefill_ms") == pytest.approx(2 / 3)


def test_round_robin_drops_a_configuration_that_runs_out_of_memory():
    log = []
    configs = [_FakeConfig("a", log), _FakeConfig("b", log, oom_at=2)]
    bench._round_robin(configs, bench.BenchSettings(warmup=0, rounds=3, device="cpu"), progress=False, log=print)
    assert configs[1].row["status"] == "OOM" and configs[1].samples.values["prefill_ms"] == [1.0]
    assert configs[0].samples.values["prefill_ms"] == [1.0, 2.0, 3.0]


def test_ratio_to_ideal_is_achieved_over_ideal_speedup():
    base = {"status": "ok", "prefill_ms": 100.0, "ideal_prefill_ms": 100.0}
    row = dict.fromkeys(bench.ROW_FIELDS) | {"status": "ok", "prefill_ms": 50.0, "ideal_prefill_ms": 40.0}
    bench._ratios(row, base)
    assert row["prefill_speedup"] == 2.0 and row["ideal_speedup"] == 2.5
    assert row["ratio_to_ideal"] == pytest.approx(0.8) == row["prefill_speedup"] / row["ideal_speedup"]
    assert row["overhead_ms"] == 10.0


def test_in_llm_rows_get_the_flops_weighted_ideal(tmp_path):
    code = main(
        [
            "bench", "--model", "tiny-llava", "--methods", "fastv,random", "--keep", "0.75", "--option", "fastv.layer=1", "--device", "cpu",
            "--warmup", "0", "--rounds", "2", "--new-tokens", "2", "--prompt-tokens", "8", "--out", str(tmp_path),
            "--no-progress",
        ]
    )  # fmt: skip
    assert code == 0
    (path,) = tmp_path.glob("*.json")
    rows = {r["method"]: r for r in json.loads(path.read_text())["rows"]}
    none, fastv, rand = rows["none"], rows["fastv"], rows["random"]
    assert none["ideal"] == rand["ideal"] == "kept-length" and fastv["ideal"] == "flops-weighted"
    lm = lambda r: r["prefill_gflops"] - r["vision_gflops"]  # noqa: E731
    # the full-length language model (the none row's ideal minus the encoder) scaled by fastv's FLOPs
    full_lm = none["ideal_prefill_ms"] - none["vision_ms"]
    assert fastv["ideal_prefill_ms"] == pytest.approx(none["vision_ms"] + full_lm * lm(fastv) / lm(none), rel=1e-3)
    assert lm(fastv) < lm(none)
    assert rand["kv_tokens"] < none["kv_tokens"] and rand["ideal_prefill_ms"] is not None
    for r in rows.values():
        assert r["ratio_to_ideal"] == pytest.approx(r["ideal_prefill_ms"] / r["prefill_ms"], rel=1e-3)
        assert r["host_ms"] > 0 and r["prefill_median_ms"] >= r["prefill_ms"]


def test_compile_needs_cuda():
    assert main(["bench", "--model", "tiny-llava", "--device", "cpu", "--compile", "--no-progress"]) == 2
