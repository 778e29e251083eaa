"""Compiled generation: a pruned model's decode step is one compiled graph, the same every step.

On a static cache each decode step hands the language model tensors of fixed shapes (a mask as wide
as the cache, in its physical columns; positions from the cache's length tensor), so a compiled
decode step neither recompiles per step nor breaks its graph. Compiled here with the "eager" backend
(runs on CPU; what dynamo captures is the same as for inductor); the GPU test runs CUDA graphs.
"""

import logging
import warnings

import pytest
import torch

import prune
from prune._compat import cache_parameter
from tests.oracle import full_inputs_embeds
from tests.test_qwen import KINDS, make_inputs

CASES = [("llava", "hiprune"), ("llava", "fastv"), ("qwen", "hiprune"), ("qwen", "fastv")]


def _case(family, method, positions=None):
    if family == "llava":
        from tests.conftest import Case

        case = Case("llava", prompts=((0,), (1,)), text_lens=(9, 9), text_layers=4)
        model, inputs = case.model, case.inputs()
    else:
        from prune._tiny import tiny_qwen_vl

        model = tiny_qwen_vl("2.5", text_layers=4)
        inputs = make_inputs([KINDS["image"], KINDS["video"]], [9, 6])
    options = {"positions": positions} if positions else {}
    prune.wrap(model, method, keep=0.6 if method == "fastv" else 0.3, **options)
    return model, inputs


class Graphs:
    """A dynamo backend that counts the graphs it is handed (and runs them as they are). A function,
    not a callable object: ``CompileConfig`` deep-copies its backend (a function copies as itself)."""

    def __init__(self):
        self.count = 0

        def backend(gm, example_inputs):
            self.count += 1
            return gm.forward

        self.backend = backend


def _static_generate(model, inputs, n, cache=None, **extra):
    kwargs = {cache_parameter(model.forward): cache} if cache is not None else {"cache_implementation": "static"}
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs, **extra)


def _compile_decode(lm, backend=None, **options):
    """The language model's forward compiled for decode steps (one new token); the prefill eager, as
    ``generate`` does when it compiles (an in-LLM cut ranks on the host: its prefill breaks graphs)."""
    eager = lm.forward
    compiled = torch.compile(eager, **({"backend": backend} if backend else {}), dynamic=False, **options)

    def forward(*args, **kwargs):
        embeds = kwargs.get("inputs_embeds")
        return (compiled if embeds is not None and embeds.shape[1] == 1 else eager)(*args, **kwargs)

    lm.forward = forward


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(cache_size_limit=64, accumulated_cache_size_limit=512):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family, method", CASES)
def test_compiled_decode_is_one_graph_for_any_number_of_steps(fresh_dynamo, family, method):
    """The language model compiled (hooks outside it, decoder-layer cuts inside): one graph for every
    decode step of a 6- and of a 12-token generate, no graph break, nothing recompiled for a second
    call on the same static cache; tokens equal the uncompiled wrapped model (static and dynamic)."""
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    model, inputs = _case(family, method)
    dynamic = model.generate(**inputs, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    eager = _static_generate(model, inputs, 12)
    assert eager.tolist() == dynamic.tolist()
    lm = prune.hooks.adapter_for(model).language_model()
    graphs = Graphs()
    _compile_decode(lm, graphs.backend)
    cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + 16)
    counts = []
    for n in (6, 12):
        torch._dynamo.reset()
        counters.clear()
        graphs.count = 0
        cache.reset()
        out = _static_generate(model, inputs, n, cache)
        assert out.tolist() == eager[:, : out.shape[1]].tolist()
        assert not counters["graph_break"], dict(counters["graph_break"])
        counts.append(graphs.count)
    assert counts == [1, 1]
    cache.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = _static_generate(model, inputs, 12, cache)  # warm: the same graph serves another call
    assert again.tolist() == eager.tolist() and graphs.count == 1


def test_compiled_vision_side_prefill_and_decode_are_two_graphs_like_unpruned(fresh_dynamo):
    """A vision-side method cuts before the language model: compiling its whole forward (prefill too)
    gives what the unpruned model gives: one prefill graph and one decode graph; tokens equal the
    oracle (the unwrapped model's generate on the reduced embeddings)."""
    from transformers import StaticCache

    model, inputs = _case("llava", "hiprune", positions="compact")
    lm = model.model.language_model
    eager = _static_generate(model, inputs, 12)
    kept = model.prune_state.last.keep_mask
    graphs = Graphs()
    lm.forward = torch.compile(lm.forward, backend=graphs.backend, dynamic=False)
    cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + 16)
    out = _static_generate(model, inputs, 12, cache)
    assert graphs.count == 2
    assert out.tolist() == eager.tolist()
    del lm.forward
    prune.unwrap(model)
    full = full_inputs_embeds(model, inputs)
    for b in range(kept.shape[0]):
        real = inputs["attention_mask"][b].bool()
        reduced = full[b][kept[b] & real]
        ref = model.generate(inputs_embeds=reduced[None], attention_mask=torch.ones(1, reduced.shape[0], dtype=torch.long),
                             max_new_tokens=12, min_new_tokens=12, do_sample=False)
        assert out[b, inputs["input_ids"].shape[1] :].tolist() == ref[0].tolist()


@pytest.mark.parametrize("family, method", [("llava", "hiprune"), ("llava", "fastv"), ("qwen", "fastv")])
def test_generate_compiling_its_own_decode_step_traces_prune_in_one_graph(fresh_dynamo, family, method):
    """``generate`` compiles the whole model call of a decode step when the cache is static (on CUDA
    by default; ``compile_config`` here): prune's hooks are traced with it, without a graph break,
    and the graphs do not grow with the number of steps (one on transformers 5.24; 5.17's Qwen adds
    one when dynamo makes the growing ``mm_token_type_ids`` dynamic, pruned or not)."""
    from torch._dynamo.utils import counters
    from transformers import CompileConfig

    model, inputs = _case(family, method)
    eager = _static_generate(model, inputs, 8)
    graphs = Graphs()
    config = CompileConfig(backend=graphs.backend, mode=None)
    config._compile_all_devices = True  # transformers' switch to compile off CUDA
    counts = []
    for n in (4, 8):
        torch._dynamo.reset()
        counters.clear()
        graphs.count = 0
        out = _static_generate(model, inputs, n, compile_config=config)
        assert out.tolist() == eager[:, : out.shape[1]].tolist()
        assert not counters["graph_break"], dict(counters["graph_break"])
        counts.append(graphs.count)
    assert counts[0] == counts[1] <= (2 if family == "qwen" else 1)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("method, layers", [("hiprune", 2), ("fastv", 4)])
def test_cuda_graphs_serve_every_pruned_decode_step(fresh_dynamo, make_case, method, layers, caplog):
    """mode="reduce-overhead": CUDA graphs are not skipped for the pruned decode step (no "skipping
    cudagraphs" warning or log, no skip counted), nothing recompiles on a second call, and tokens
    equal eager."""
    from torch._dynamo.utils import counters
    from transformers import StaticCache

    case = make_case("llava", prompts=((0,), (1,)), text_lens=(9, 9), text_layers=layers)
    model = prune.wrap(case.model.cuda(), method, keep=0.75 if method == "fastv" else 0.3)
    inputs = {k: v.cuda() for k, v in case.inputs().items()}
    eager = _static_generate(model, inputs, 12)
    lm = model.model.language_model
    cache = StaticCache(config=model.config, max_cache_len=inputs["input_ids"].shape[1] + 16)
    _static_generate(model, inputs, 1, cache)  # the cache allocates its buffers eagerly (static addresses)
    _compile_decode(lm, mode="reduce-overhead")
    caplog.set_level(logging.DEBUG)
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            cache.reset()
            out = _static_generate(model, inputs, 12, cache)
            assert out.tolist() == eager.tolist()
        cache.reset()
        with torch._dynamo.config.patch(error_on_recompile=True):
            _static_generate(model, inputs, 12, cache)
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "skipping cudagraphs" in m.lower()], messages
    assert counters["inductor"]["cudagraph_skips"] == 0
