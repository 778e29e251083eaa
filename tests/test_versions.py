"""The version policy and the version-proof seams into transformers."""

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
import transformers
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

import prune
from prune import _compat
from prune._compat import cache_parameter, find_cache, in_tested_range, past_length, with_cache
from prune._tiny import tiny_llava

ROOT = Path(__file__).resolve().parents[1]


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_declares_the_tested_range():
    project = _pyproject()
    assert tuple(project["tool"]["prune"]["tested-transformers"]) == _compat.TESTED_TRANSFORMERS
    (dep,) = [d for d in project["project"]["dependencies"] if d.startswith("transformers")]
    low = re.search(r">=\s*([\d.]+)", dep).group(1)
    assert _compat._release(low) == _compat._release(_compat.TESTED_TRANSFORMERS[0])
    # lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed
    assert "filelock<4" in project["project"]["optional-dependencies"]["eval"]


@pytest.mark.parametrize(
    "version, inside",
    [("5.17.0", True), ("5.20.1", True), ("5.24.0", True), ("5.24.3", True), ("5.25.0", True),
     ("5.25.4", True), ("5.26.0", False), ("5.26.0.dev0", False), ("5.16.2", False), ("4.57.0", False), ("6.0.0", False)],
)
def test_tested_range(version, inside):
    assert in_tested_range(version) is inside


def test_wrap_warns_once_outside_the_tested_range(monkeypatch):
    monkeypatch.setattr(_compat, "transformers_version", lambda: "5.99.0")
    monkeypatch.setattr(_compat, "_warned_versions", set())
    model = tiny_llava()
    with pytest.warns(UserWarning, match=rf"tested with transformers {re.escape(_compat.TESTED_TRANSFORMERS[0])} to "
                      rf"{re.escape(_compat.TESTED_TRANSFORMERS[1])}.*5\.99\.0"):
        prune.wrap(model, "random", keep=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune.wrap(model, "random", keep=0.5)  # once per process


def test_wrap_is_silent_inside_the_tested_range():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prune.wrap(tiny_llava(), "random", keep=0.5)


def test_cache_found_by_type_under_any_name():
    cache = DynamicCache()
    k = torch.zeros(1, 2, 3, 4)
    cache.update(k, k.clone(), 0)
    for name in ("cache", "past_key_values", "kv_state_of_next_release"):
        kwargs = {"inputs_embeds": torch.zeros(1, 1, 4), "position_embeddings": (k, k), name: cache}
        assert find_cache(kwargs) is cache
        assert past_length(kwargs) == 3
    legacy = ((k, k.clone()),)
    assert past_length({"whatever": legacy}) == 3
    assert find_cache({"position_embeddings": (k[0], k[0]), "input_ids": torch.zeros(1, 3)}) is None
    assert past_length({}) == 0


def test_cache_parameter_follows_the_signature():
    import inspect

    expected = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
    assert cache_parameter(create_causal_mask) == expected
    lm = tiny_llava().model.language_model
    assert cache_parameter(lm.forward) == expected
    assert cache_parameter(lm.layers[0].forward) == expected

    from transformers import Cache

    def future(hidden, state_of_keys: Cache | None = None, use_cache: bool = True):
        return state_of_keys

    assert cache_parameter(future) == "state_of_keys"
    assert with_cache(future, 7, hidden=1) == {"hidden": 1, "state_of_keys": 7}
    with pytest.raises(TypeError, match="takes no cache"):
        cache_parameter(lambda x: x)


def test_generate_emits_no_deprecation_warnings(make_case):
    """transformers warns about deprecated internal names (removed in 5.40): prune must not use them."""
    for method in ("hiprune", "fastv"):
        case = make_case("llava", prompts=((0,),), text_layers=4)
        prune.wrap(case.model, method, keep=0.75)
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            case.model.generate(**case.inputs(), max_new_tokens=3, do_sample=False)


def test_prune_env_names_every_dependency():
    out = subprocess.run([sys.executable, "-m", "prune.cli", "env"], capture_output=True, text=True, check=True)
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert set(lines) >= {"prune", "python", "torch", "transformers", "triton", "lmms-eval", "decord", "device"}
    assert transformers.__version__ in lines["transformers"]
    assert " .. ".join(_compat.TESTED_TRANSFORMERS) in lines["transformers"]
    assert lines["transformers"].rstrip().endswith("ok")
    as_json = subprocess.run([sys.executable, "-m", "prune.cli", "env", "--json"], capture_output=True, text=True,
                             check=True)
    assert '"transformers"' in as_json.stdout
