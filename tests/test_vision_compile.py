"""``vision_compile=True``: every untapped vision-encoder layer run through ``torch.compile``.

Contract: a compiled model computes what the same wrap uncompiled computes (prefill logits, kept
tokens, generated ids) for post-encoder and encoder-stage pruning, LLaVA (CLIP) and Qwen2.5-VL /
Qwen3-VL (segmented windows, which enter the graph as one operator: no graph break); identical
layers share one compiled graph (no recompilation per layer); batch = singles; autograd, a failed
compiler and copies run correctly. CPU tests trace through AOTAutograd (``aot_eager``: the operator's
fake implementation is exercised) and one runs inductor; GPU tests run inductor, with and without
``vision_graphs``."""

import copy
import threading
import warnings

import pytest
import torch

import prune
from prune._tiny import tiny_qwen3_vl, tiny_qwen_vl
from prune.hooks import adapter_for
from prune.hooks import vision_compile as VC  # noqa: N812
from prune.hooks import vision_graphs as VG  # noqa: N812
from tests.test_encoder_stage_qwen import _same_media
from tests.test_encoder_stage_qwen import make_inputs as qwen_inputs

CUDA = torch.cuda.is_available()
GEN = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False}
QWEN_PROMPTS = [[("image", (1, 8, 12))], [("image", (1, 12, 8)), ("video", (2, 8, 8))]]


class Counting:
    """A torch.compile backend that counts the graphs it is given and runs them through AOTAutograd."""

    def __init__(self, fail: bool = False) -> None:
        self.graphs, self.fail = 0, fail

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        if self.fail:
            raise RuntimeError("this backend cannot compile")
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _qwen(family="qwen2_5_vl", depth=4):
    if family == "qwen3_vl":
        return tiny_qwen3_vl(attn_implementation="sdpa")
    return tiny_qwen_vl("2.5", attn_implementation="sdpa", depth=depth, fullatt=[depth // 2 - 1, depth - 1])


def _run(model, inputs, calls=2):
    """Prefill logits, kept mask and greedy ids (of the last of ``calls`` calls)."""
    with torch.no_grad():
        for _ in range(calls):
            logits = model(**inputs).logits
        keep = model.prune_state.last.keep_mask.clone()
        ids = model.generate(**inputs, **GEN)
    return logits, keep, ids


def _compile_by_hand(model, backend):
    """What ``vision_compile=True`` installs, with a chosen backend (CPU tests)."""
    owner, removers = VC.install(adapter_for(model), VC.VisionCompile(backend=backend))
    model.prune_state.vision_compile = owner
    model.prune_state._removers.extend(removers)
    return owner


def _same(out, ref, tol=1e-5):
    torch.testing.assert_close(out[0], ref[0], atol=tol, rtol=tol)
    assert torch.equal(out[1], ref[1]) and torch.equal(out[2], ref[2])


def _compiled_equals_eager(model, inputs):
    """Run the wrapped model eagerly, compile its layers by hand (a counting backend), run it again
    and check both agree; returns the owner, the backend and the eager outputs."""
    ref = _run(model, inputs, calls=1)
    backend = Counting()
    owner = _compile_by_hand(model, backend)
    _same(_run(model, inputs), ref)
    return owner, backend, ref


# ---- checks at wrap time ----------------------------------------------------------------------
def test_vision_compile_argument_is_checked_at_wrap_time():
    model = tiny_qwen_vl("2.5", attn_implementation="sdpa")
    with pytest.raises(TypeError, match="vision_compile"):
        prune.wrap(model, "hiprune", keep=0.3, vision_compile="yes")
    with pytest.raises(TypeError, match="vision_compile"):
        prune.PruneConfig(method="hiprune", vision_compile=1)
    with pytest.raises(TypeError, match="either a PruneConfig"):
        prune.wrap(model, prune.PruneConfig(method="hiprune"), vision_compile=True)
    with pytest.raises(ValueError, match="vision_compile=True on .* needs vision_attention='segmented'"):
        prune.wrap(model, "hiprune", keep=0.3, vision_attention="default", vision_compile=True)
    assert not hasattr(model, "prune_state")  # a refused wrap changes nothing


def test_vision_compile_installs_on_untapped_layers_and_unwrap_removes_it():
    model = prune.wrap(_qwen(), "hiprune", keep=0.3, vision_attention="segmented", vision_compile=True)
    owner = model.prune_state.vision_compile
    layers = VG.vision_layers(adapter_for(model))
    assert owner.skipped and set(owner.skipped) < set(range(len(layers)))  # the tapped layers
    for i, layer in enumerate(layers):
        assert isinstance(layer.__dict__.get("forward"), VC.CompiledLayer) == (i not in owner.skipped)
    prune.unwrap(model)
    assert all("forward" not in layer.__dict__ for layer in layers)


# ---- compiled = eager (CPU, through AOTAutograd) -----------------------------------------------
@pytest.mark.parametrize(("family", "method", "stage"), [
    ("qwen2_5_vl", "hiprune", "post_encoder"),
    ("qwen2_5_vl", "hiprune", "encoder"),
    ("qwen2_5_vl", "random", "post_encoder"),
    ("qwen3_vl", "hiprune", "encoder"),
])
def test_vision_compile_equals_the_eager_wrap_qwen(family, method, stage):
    options = {"stage": stage} if stage == "encoder" else {}
    inputs = qwen_inputs(family, QWEN_PROMPTS, [5, 14], seed=4)
    model = prune.wrap(_qwen(family), method, keep=0.3, vision_attention="segmented", **options)
    owner, backend, ref = _compiled_equals_eager(model, inputs)
    stats = owner.stats()
    assert stats["compiled"] > 0 and stats["failed"] is None
    assert backend.graphs <= 4  # static, then symbolic sizes; never one graph per layer
    from torch._dynamo.utils import counters

    assert not any("segmented" in str(reason) for reason in counters["graph_break"])


def test_vision_compile_shares_one_graph_among_identical_layers():
    """Twelve layers (three of them full-attention, one tapped), two calls: a handful of graphs."""
    inputs = qwen_inputs("qwen2_5_vl", QWEN_PROMPTS, [5, 14], seed=4)
    model = prune.wrap(_qwen(depth=12), "hiprune", keep=0.3, vision_attention="segmented", stage="encoder")
    owner, backend, ref = _compiled_equals_eager(model, inputs)
    assert owner.stats()["compiled"] >= 2 * (12 - len(owner.skipped))
    assert backend.graphs <= 4


@pytest.mark.parametrize("stage", ["post_encoder", "encoder"])
@pytest.mark.parametrize("method", ["cls", "hiprune"])
def test_vision_compile_equals_the_eager_wrap_llava(make_case, method, stage):
    case = make_case("llava", attn="sdpa", prompts=((0, 1), (2,)), text_lens=(12, 7))
    options = {"stage": stage} if stage == "encoder" else {}
    model = prune.wrap(case.model, method, keep=0.25, **options)
    owner, backend, ref = _compiled_equals_eager(model, case.inputs())
    assert owner.stats()["compiled"] > 0 and backend.graphs <= 4


def test_vision_compile_batch_equals_singles():
    model = prune.wrap(_qwen(), "hiprune", keep=0.3, vision_attention="segmented", stage="encoder")
    _compile_by_hand(model, Counting())
    inputs = qwen_inputs("qwen2_5_vl", QWEN_PROMPTS, [5, 14], seed=4)
    _, kept, ids = _run(model, inputs)
    for row in range(len(QWEN_PROMPTS)):
        single = _same_media(qwen_inputs("qwen2_5_vl", [QWEN_PROMPTS[row]], [[5, 14][row]], seed=4), inputs,
                             QWEN_PROMPTS, row)
        _, one_kept, one_ids = _run(model, single)
        assert kept[row, -one_kept.shape[1]:].tolist() == one_kept[0].tolist()
        assert one_ids[0, single["input_ids"].shape[1]:].tolist() == ids[row, inputs["input_ids"].shape[1]:].tolist()


def test_vision_compile_shared_owner_survives_rewraps():
    """Benchmarks re-wrap one model per row and point each wrap at one owner (``share``): its compiled
    function is compiled once and kept across unwraps; a wrap's own owner goes with its unwrap."""
    inputs = qwen_inputs("qwen2_5_vl", QWEN_PROMPTS, [5, 14], seed=4)
    model = _qwen()
    backend = Counting()
    shared = VC.VisionCompile(backend=backend)
    graphs = []
    for stage in ("post_encoder", "encoder", "post_encoder", "encoder"):
        prune.wrap(model, "hiprune", keep=0.3, vision_attention="segmented", vision_compile=True,
                   **({"stage": "encoder"} if stage == "encoder" else {}))
        own = model.prune_state.vision_compile
        VC.share(model, shared)
        assert model.prune_state.vision_compile is shared
        _run(model, inputs, calls=1)
        graphs.append(backend.graphs)
        prune.unwrap(model)
        assert own._function is None and shared._function is not None
    assert graphs[2:] == [graphs[1]] * 2  # the later wraps compiled nothing new
    assert shared.stats()["compiled"] > 0 and shared.stats()["eager"] == 0


def test_vision_compile_stops_compiling_past_its_cap(monkeypatch):
    """Past MAX_GRAPHS an owner compiles nothing more (no new graph, no nested module compiled): new
    input structures run eagerly and stay right; structures compiled before still run compiled."""
    monkeypatch.setattr(VC, "MAX_GRAPHS", 1)
    inputs = qwen_inputs("qwen2_5_vl", QWEN_PROMPTS, [5, 14], seed=4)
    model = prune.wrap(_qwen(), "hiprune", keep=0.3, vision_attention="segmented", stage="encoder")
    owner, backend, ref = _compiled_equals_eager(model, inputs)
    stats = owner.stats()
    assert backend.graphs == stats["graphs"] == 1 and stats["capped"] > 0
    _same(_run(model, inputs), ref)  # the structure compiled before the cap still runs compiled
    assert owner.stats()["compiled"] > stats["compiled"] and backend.graphs == 1


# ---- eager fallbacks ----------------------------------------------------------------------------
def test_vision_compile_runs_eagerly_under_autograd():
    inputs = qwen_inputs("qwen2_5_vl", QWEN_PROMPTS, [5, 14], seed=4)
    model = prune.wrap(_qwen(), "hiprune", keep=0.3, vision_attention="segmented")
    backend = Counting()
    owner = _compile_by_hand(model, backend)
    model(**inputs).logits.sum().backward()  # grad on: the layers run eagerly, gradients flow
    assert backend.graphs == 0 and owner.stats()["compiled"] == 0 and owner.stats()["eager"] > 0
    assert model.model.visual.blocks[0].mlp.down_proj.weight.grad is not None


def test_vision_compile_failure_warns_once_and_runs_eagerly():
    inputs = qwen_inputs("qwen2_5_vl", QWEN_PROMPTS, [5, 14], seed=4)
    model = prune.wrap(_qwen(), "hiprune", keep=0.3, vision_attention="segmented")
    ref = _run(model, inputs, calls=1)
    owner = _compile_by_hand(model, Counting(fail=True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run(model, inputs)
    _same(out, ref)
    assert owner.stats()["failed"] and "cannot compile" in owner.stats()["failed"]
    assert sum("vision layers run eagerly" in str(w.message) for w in caught) == 1


def test_vision_compile_copies_compile_their_own_and_threads_agree():
    inputs = qwen_inputs("qwen2_5_vl", QWEN_PROMPTS, [5, 14], seed=4)
    model = prune.wrap(_qwen(), "hiprune", keep=0.3, vision_attention="segmented")
    ref = _run(model, inputs, calls=1)
    owner = _compile_by_hand(model, "aot_eager")
    _same(_run(model, inputs), ref)
    twin = copy.deepcopy(model)
    twin_owner = twin.prune_state.vision_compile
    assert twin_owner is not owner and twin_owner.backend == "aot_eager" and twin_owner.stats()["compiled"] == 0
    _same(_run(twin, inputs), ref)
    assert twin_owner.stats()["compiled"] > 0
    results, errors = {}, []

    def call(name):
        try:
            with torch.no_grad():
                results[name] = model(**inputs).logits
        except Exception as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=call, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for name in "ab":
        torch.testing.assert_close(results[name], ref[0], atol=1e-5, rtol=1e-5)


def test_vision_compile_with_inductor_on_the_cpu(make_case):
    """``vision_compile=True`` as users call it (inductor) on a tiny CLIP encoder."""
    case = make_case("llava", attn="sdpa", prompts=((0,), (1,)), text_lens=(9, 6))
    model = prune.wrap(case.model, "hiprune", keep=0.25)
    ref = _run(model, case.inputs(), calls=1)
    prune.wrap(model, "hiprune", keep=0.25, vision_compile=True)
    _same(_run(model, case.inputs()), ref, tol=1e-4)
    assert model.prune_state.vision_compile.stats()["compiled"] > 0


# ---- inductor on the GPU, with and without CUDA graphs ------------------------------------------
def _cuda(inputs):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("stage", ["post_encoder", "encoder"])
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_gpu_vision_compile_equals_the_eager_wrap_qwen(family, stage, graphs):
    options = {"stage": stage} if stage == "encoder" else {}
    inputs = _cuda(qwen_inputs(family, QWEN_PROMPTS, [5, 14], seed=4))
    model = _qwen(family).cuda()
    prune.wrap(model, "hiprune", keep=0.3, vision_attention="segmented", **options)
    ref = _run(model, inputs, calls=1)
    prune.wrap(model, "hiprune", keep=0.3, vision_attention="segmented", vision_compile=True,
               vision_graphs=graphs, **options)
    out = _run(model, inputs, calls=3)
    _same(out, ref, tol=1e-4)
    assert model.prune_state.vision_compile.stats()["compiled"] > 0
    assert model.prune_state.vision_compile.stats()["failed"] is None
    if graphs:
        stats = model.prune_state.vision_graphs.stats()
        assert stats["replays"] > 0 and not stats["eager_layers"]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("stage", ["post_encoder", "encoder"])
def test_gpu_vision_compile_equals_the_eager_wrap_llava_and_batch_equals_singles(make_case, stage):
    case = make_case("llava", attn="sdpa", prompts=((0, 1), (2,)), text_lens=(12, 7))
    model = case.model.cuda()
    options = {"stage": stage} if stage == "encoder" else {}
    prune.wrap(model, "cls", keep=0.25, **options)
    ref = _run(model, _cuda(case.inputs()), calls=1)
    prune.wrap(model, "cls", keep=0.25, vision_compile=True, vision_graphs=True, **options)
    out = _run(model, _cuda(case.inputs()), calls=3)
    _same(out, ref, tol=1e-4)
    for row in range(2):
        one = _run(model, _cuda(case.inputs([row])), calls=3)
        assert one[2][0, -GEN["max_new_tokens"]:].tolist() == out[2][row, -GEN["max_new_tokens"]:].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_gpu_segmented_operator_inside_inductor_runs_the_fused_flex_kernel():
    """Inside a compiled graph the segmented attention is one operator whose FlexAttention still runs
    compiled (fused: no (N, N) scores in memory) and equals the per-segment reference."""
    from prune.kernels import segmented_attention_reference
    from prune.kernels.segmented_attention import segmented_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    n, heads, dim = 8192, 4, 64
    q, k, v = (torch.randn(1, heads, n, dim, device="cuda", generator=gen) for _ in range(3))
    cu = torch.tensor([0, 3000, 3001, 6000, n], device="cuda", dtype=torch.int32)

    def block(q, k, v, cu):
        return segmented_attention((q * 1.5).sin(), k, v, cu).cos() + 1

    compiled = torch.compile(block, backend="inductor")
    with torch.no_grad():
        compiled(q, k, v, cu)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        out = compiled(q, k, v, cu)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
        ref = segmented_attention_reference((q * 1.5).sin(), k, v, cu.cpu()).cos() + 1
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    assert peak < heads * n * n * 4 / 8  # eager FlexAttention would hold (H, N, N) fp32 scores
