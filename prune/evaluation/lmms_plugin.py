"""lmms-eval bridge: every lmms-eval task on a pruned model, without a fork.

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (see pyproject.toml)::

    python -m lmms_eval --model pruned \\
        --model_args base=llava_hf,pretrained=/path/to/llava,method=hiprune,keep=0.33,alpha=0.1 \\
        --tasks prune_shapes --include_path "$(python -m prune.evaluation.tasks)"

``base`` names an lmms-eval model (``llava_hf``, ``qwen2_5_vl``, ...); it is built by lmms-eval as
usual from the remaining arguments, then its Hugging Face model is wrapped with :func:`prune.wrap`.
``method`` (a prune method, or ``none`` for the unpruned model with the same statistics), ``keep``
(a fraction in (0, 1] -- write ``1.0`` for all tokens -- or an int token count), ``positions``,
``vision_attention`` (``segmented`` | ``default``), ``vision_graphs`` and ``vision_compile``
(``True`` | ``False``) and
the method's options (``prune methods`` lists them; prefix one with ``prune_`` if the base model has
an argument of the same name) go to prune; everything else goes to the base model.

Statistics (prompts with vision tokens, vision tokens per prompt before and after pruning, mean
prefill ms from ``generate()`` entry to the end of the prefill forward) are gathered over all
processes under ``accelerate launch`` (one process per device) and added to the results JSON under
``throughput`` as ``avg_prune_*`` (lmms-eval's own section for model-side efficiency numbers).
Supported lmms-eval: 0.7.3 and later 0.7.x (``LMMS_EVAL_RANGE``).
"""

from __future__ import annotations

import functools
from typing import Any

from lmms_eval.api.model import lmms
from torch import nn

import prune
from prune.config import PruneConfig

from .stats import PruneStats, Totals, gather_totals, summarize

__all__ = [
    "PrunedChat",
    "PrunedSimple",
    "PruneStats",
    "Totals",
    "build",
    "gather_totals",
    "manifests",
    "summarize",
]

LMMS_EVAL_RANGE = ">=0.7.3,<0.8"
MODEL_ID = "pruned"
PRUNE_KEYS = ("method", "keep", "positions", "vision_attention", "vision_graphs", "vision_compile")


def manifests():
    """Entry point ``lmms_eval.models``: the ``pruned`` model, a chat and a simple flavour (lmms-eval
    picks chat unless ``--force_simple``; the base model is resolved the same way)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(
            model_id=MODEL_ID,
            simple_class_path=f"{__name__}.PrunedSimple",
            chat_class_path=f"{__name__}.PrunedChat",
        )
    ]


def split_model_args(args: dict[str, Any]) -> tuple[str, PruneConfig | None, dict[str, Any]]:
    """(base model name, prune config or None for ``method=none``, the base model's arguments)."""
    from prune.methods import get_method

    args = dict(args)
    base = args.pop("base", None)
    if not base:
        raise ValueError(
            "--model pruned needs base=<an lmms-eval model>, e.g. --model_args base=llava_hf,pretrained=..."
        )
    method = str(args.pop("method", "hiprune"))
    keep = args.pop("keep", 0.33)
    positions = args.pop("positions", None)
    vision_attention = args.pop("vision_attention", None)
    flags = {name: _flag(name, args.pop(name)) for name in ("vision_graphs", "vision_compile") if name in args}
    options = {k[len("prune_") :]: args.pop(k) for k in list(args) if k.startswith("prune_")}
    if method == "none":
        if options:
            raise ValueError(f"method=none takes no options, got {', '.join(options)}")
        return str(base), None, args
    defaults = get_method(method).defaults  # raises for an unknown method name
    # an option name is prune's, unless prune_<name> was given: then the plain name is the base model's
    options.update({k: args.pop(k) for k in list(args) if k in defaults and k not in options})
    config = PruneConfig(
        method=method, keep=keep, positions=positions, options=options, vision_attention=vision_attention, **flags
    )
    return str(base), config, args


def _flag(name: str, value: Any) -> bool:
    """A boolean model argument: lmms-eval passes ``True`` / ``False`` parsed, or as text."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be True or False, got {value!r}")


def find_hf_model(lm: Any) -> nn.Module:
    """The Hugging Face model an lmms-eval model holds (unwrapped from accelerate where it is)."""
    from prune.hooks import supported_classes

    found = []
    for name in ("model", "_model"):
        try:
            value = getattr(lm, name, None)
        except Exception:  # noqa: BLE001 - a property of the base model may raise before setup
            value = None
        if isinstance(value, nn.Module):
            value = getattr(value, "module", value)  # a DDP wrapper
            found.append(value)
    for module in found:
        if type(module).__name__ in supported_classes():
            return module
    if found:
        return found[0]  # prune.wrap names the class it does not support
    raise TypeError(f"{type(lm).__name__} holds no torch model under .model or ._model for prune to wrap")


class _PrunedMixin:
    """Mixed in front of the base lmms-eval model class: wrap after the base is built, report on clean."""

    def __init__(self, *args, prune_config: PruneConfig | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.prune_config = prune_config
        self.prune_keep_model = False  # prune eval sweeps reuse one model across evaluations
        self.prune_summary: dict[str, Any] = {}
        hf = find_hf_model(self)
        if prune_config is not None:
            prune.wrap(hf, prune_config)
        self.prune_stats = PruneStats(hf)

    def prune_rewrap(self, config: PruneConfig | None) -> None:
        """Switch the method (None: unpruned) on the same loaded model; statistics restart."""
        hf = self.prune_stats.model
        if getattr(hf, "prune_state", None) is not None:
            prune.unwrap(hf)
        if config is not None:
            prune.wrap(hf, config)
        self.prune_config = config
        self.prune_stats.reset()

    def clean(self):
        import torch.distributed as dist

        summary = summarize(self.prune_stats.gathered(), self.prune_config)
        self.prune_stats.reset()
        self.prune_summary = summary
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if summary and rank == 0:
            from lmms_eval.models.model_utils.gen_metrics import log_metrics

            method = self.prune_config.method if self.prune_config is not None else "none"
            log_metrics(0.0, 0, 0.0, additional_metrics={"prune_method": method, **summary})
        if self.prune_keep_model:
            return None
        self.prune_stats.remove()
        return super().clean()


@functools.cache
def _pruned_class(base_cls: type) -> type:
    return type(f"Pruned{base_cls.__name__}", (_PrunedMixin, base_cls), {"__module__": __name__})


def build(args: dict[str, Any], *, force_simple: bool = False) -> lmms:
    """The base lmms-eval model built from ``args`` (``base=`` and prune's keys removed), wrapped."""
    from lmms_eval.models import get_model

    base, config, base_args = split_model_args(args)
    base_cls = get_model(base, force_simple=force_simple)
    return _pruned_class(base_cls)(prune_config=config, **base_args)


class _Pruned(lmms):
    """What lmms-eval's registry resolves ``pruned`` to; constructing it builds the wrapped base model
    (an instance of a subclass of the base model's class, so lmms-eval sees the base model's API)."""

    def __new__(cls, **kwargs):
        return build(kwargs, force_simple=cls.is_simple)

    # never reached: __new__ returns the base model's instance
    def loglikelihood(self, requests):  # pragma: no cover
        raise NotImplementedError

    def generate_until(self, requests):  # pragma: no cover
        raise NotImplementedError

    def generate_until_multi_round(self, requests):  # pragma: no cover
        raise NotImplementedError


class PrunedChat(_Pruned):
    is_simple = False


class PrunedSimple(_Pruned):
    is_simple = True
