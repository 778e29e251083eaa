"""On a CUDA device, prune's code from the encoder's statistics to the language model's input runs
under ``torch.cuda.set_sync_debug_mode("error")``: no device-to-host copy, no synchronisation
(run on the GPU machine: ``pytest -m gpu tests/test_gpu_sync.py``).

The window is prune's own code: the attention tap (statistics, Triton) and the language model's
pre-hook (layouts, budgets, the batched selection, the scatter, the cut). The model's own code in
between syncs in the unwrapped model too (transformers' placeholder-count check, Qwen's
``get_rope_index``) and is not prune's to change; prune's one read of the prompt and the copy of the
shape arguments happen before the encoder is queued (see ``Adapter._prompt_on_host``)."""

import functools

import pytest
import torch

import prune
from prune.hooks import adapter_for, base
from prune.methods import Method, get_method

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
CASES = [("llava", m) for m in ("random", "pool", "cls", "hiprune")]
CASES += [("qwen2_5_vl", m) for m in ("random", "pool", "hiprune")]
CASES += [("llava_next", m) for m in ("random", "pool", "cls", "hiprune")]


class _Window:
    """Sync debug mode "error" inside prune's window, once armed."""

    def __init__(self) -> None:
        self.armed = False

    def wrap(self, fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            if not self.armed:
                return fn(*args, **kwargs)
            before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(before)

        return inner

    def hook_module(self, module) -> None:
        """The module's whole forward inside the window (forward pre- and post-hooks)."""
        saved = []

        def enter(*_args):
            if self.armed:
                saved.append(torch.cuda.get_sync_debug_mode())
                torch.cuda.set_sync_debug_mode("error")

        def leave(*_args):
            if saved:
                torch.cuda.set_sync_debug_mode(saved.pop())

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def _case(family):
    from tests.test_select_batch import _family_cases

    model, inputs = _family_cases()[family][0]()
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    return model.cuda(), inputs


def _armed_prefill_and_generate(monkeypatch, window, model, inputs, method):
    """A warm-up call, then a prefill and a short generate inside the armed window; the kept set and
    the logits equal the per-view reference's (``select_batch`` replaced by the view-by-view loop)."""
    with torch.no_grad():
        model(**inputs)  # warm-up: kernels compile, pinned blocks and cached index copies are made
        window.armed = True
        logits = model(**inputs).logits
        keep = model.prune_state.last.keep_mask.clone()
        tokens = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        window.armed = False
        monkeypatch.setattr(get_method(method), "select_batch", Method.select_batch)
        ref_logits = model(**inputs).logits
        ref_keep = model.prune_state.last.keep_mask
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert tokens.shape[1] == inputs["input_ids"].shape[1] + 3


@cuda
@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_cuda_prefill_and_generate_have_no_sync_in_prune(monkeypatch, family, method):
    window = _Window()
    monkeypatch.setattr(base.Adapter, "_on_language_model_call", window.wrap(base.Adapter._on_language_model_call))
    monkeypatch.setattr(base.Adapter, "_collect", window.wrap(base.Adapter._collect))
    model, inputs = _case(family)
    prune.wrap(model, method, keep=0.3)
    _armed_prefill_and_generate(monkeypatch, window, model, inputs, method)


STAGE_CASES = [("llava", "cls"), ("llava", "hiprune"), ("llava_next", "hiprune"), ("qwen2_5_vl", "hiprune"),
               ("qwen2_vl", "hiprune")]


@cuda
@pytest.mark.parametrize("family,method", STAGE_CASES, ids=[f"{f}-{m}" for f, m in STAGE_CASES])
def test_cuda_encoder_stage_has_no_sync_in_prune(monkeypatch, family, method):
    """``stage="encoder"``: the selection inside the encoder (after the cut layer), the mapping of the
    later blocks' arguments (Qwen: rotary rows and segment boundaries, on the device under the
    segmented attention the wrap picks on CUDA), the scatter after the tower and the language
    model's cut run without a device read, and so does every vision attention (Qwen: the tapped
    layers too); the kept set is the per-view reference's."""
    from prune.hooks import encoder_stage

    window = _Window()
    monkeypatch.setattr(base.Adapter, "_on_language_model_call", window.wrap(base.Adapter._on_language_model_call))
    monkeypatch.setattr(base.Adapter, "_collect", window.wrap(base.Adapter._collect))
    for name in ("_after_cut_layer", "_after_tower", "_packed_after_cut", "_packed_before_block", "_packed_scatter"):
        monkeypatch.setattr(encoder_stage, name, window.wrap(getattr(encoder_stage, name)))
    model, inputs = _case(family)
    prune.wrap(model, method, keep=0.3, stage="encoder")
    if family.startswith("qwen"):
        assert model.prune_state.vision_attention == "segmented"
        # every vision attention, the tapped cut layer's too (one call with cu_seqlens: no per-segment
        # split with lengths.tolist())
        for module in adapter_for(model).vision_attention_modules():
            window.hook_module(module)
    _armed_prefill_and_generate(monkeypatch, window, model, inputs, method)


@cuda
@pytest.mark.parametrize("method", ["random", "cls", "hiprune", "fastv", "pdrop", "transprune"])
def test_cuda_whole_prefill_has_no_sync_after_the_prompt_read(monkeypatch, method):
    """The whole prefill forward of a wrapped LLaVA (SDPA, prompts that keep equal counts), the
    model's own code included (encoder, placeholder check, masked scatter, language model, an in-LLM
    method's cuts inside it), once prune has read the prompt in the multimodal forward's pre-hook:
    the GPU twin of tests/test_post_encoder.py."""
    from tests.test_post_encoder import _deep_llava

    in_llm = getattr(get_method(method), "in_llm", False)

    window = _Window()
    before = base.Adapter._on_multimodal_call

    def arm_after(self, *args, **kwargs):
        out = before(self, *args, **kwargs)
        if window.armed:
            torch.cuda.set_sync_debug_mode("error")
        return out

    monkeypatch.setattr(base.Adapter, "_on_multimodal_call", arm_after)
    model, inputs = _deep_llava()
    model, inputs = model.cuda(), {k: v.cuda() for k, v in inputs.items()}
    prune.wrap(model, method, keep=0.5 if in_llm else 0.3)
    with torch.no_grad():
        model(**inputs, use_cache=True)  # warm-up
        window.armed = True
        try:
            model(**inputs, use_cache=True)
        finally:
            window.armed = False
            torch.cuda.set_sync_debug_mode("default")
    last = model.prune_state.last
    if in_llm:
        assert int(last.layer_masks[-1][1].sum()) < last.layer_masks[-1][1].numel()
    else:
        assert last.vision_tokens_after < last.vision_tokens_before


@cuda
@pytest.mark.parametrize("family", ["llava", "qwen2_5_vl", "qwen2_vl"])
def test_cuda_host_helpers_do_not_sync(monkeypatch, family):
    """In a prefill forward, the model's placeholder check and (Qwen) M-RoPE index run on prune's host
    copies without a device read, images and a video in the batch, and give what the model's own
    device path gives. (``generate`` itself calls Qwen's index once at its start, before prune has the
    call: the model's own path, outside the window.)"""
    window = _Window()
    monkeypatch.setattr(base.Adapter, "_host_call", window.wrap(base.Adapter._host_call))
    model, inputs = _case(family)
    prune.wrap(model, "hiprune", keep=0.3)
    with torch.no_grad():
        model(**inputs)  # warm-up
        window.armed = True
        logits = model(**inputs).logits
        window.armed = False
        tokens = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        monkeypatch.setattr(base.Adapter, "_host_call",
                            lambda self, original, args, kwargs, shape_only: original(*args, **kwargs))
        ref_logits = model(**inputs).logits
        ref_tokens = model.generate(**inputs, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(tokens, ref_tokens)
