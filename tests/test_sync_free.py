"""From the encoder's statistics to the language model's input, prune reads nothing back from the
device: checked on the CPU by following which tensors would be device tensors (tests/host_reads.py),
for every vision-side method of the fast path on the families it is measured on. The GPU twin, under
``torch.cuda.set_sync_debug_mode("error")``, is tests/test_gpu_sync.py."""

import pytest
import torch

import prune
from tests.host_reads import watch
from tests.test_select_batch import _family_cases

FAMILIES = {
    "llava": ["random", "pool", "cls", "hiprune"],
    "llava_next": ["random", "pool", "cls", "hiprune"],
    "qwen2_5_vl": ["random", "pool", "hiprune"],
    "qwen2_vl": ["hiprune"],
    "internvl": ["hiprune"],
    "llava_onevision": ["hiprune", "pool"],
    "qwen3_vl": ["hiprune"],
}
CASES = [(f, m) for f, methods in FAMILIES.items() for m in methods]


@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_no_host_read_between_encoder_and_language_model(monkeypatch, family, method):
    model, inputs = _family_cases()[family][0]()
    with watch(monkeypatch, inputs) as mode:
        prune.wrap(model, method, keep=0.3)
        with torch.no_grad():
            model(**inputs)
    assert model.prune_state.last.vision_tokens_after < model.prune_state.last.vision_tokens_before
    assert mode.reads == [], "\n".join(mode.reads[:3])


def test_the_detector_sees_reads(monkeypatch):
    """A data-dependent count (hiprune's opt-in reference exclusion) must read back: the check can fail."""
    model, inputs = _family_cases()["llava"][0]()
    with watch(monkeypatch, inputs) as mode:
        prune.wrap(model, "hiprune", keep=0.3, exclusion="reference")
        with torch.no_grad():
            model(**inputs)
    assert mode.reads
