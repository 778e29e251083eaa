"""PruneConfig: everything that defines a pruning run, validated in one place."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .methods import get_method

POSITION_MODES = ("original", "compact")
VISION_ATTENTION = ("segmented", "default")


def configs_dir() -> Path:
    """The shipped ``configs/`` folder: the one beside the imported ``prune`` package when that is a
    source checkout (so a git worktree reads its own presets, even where an editable install of
    another checkout maps ``prune.configs`` elsewhere), else the package data ``prune.configs``."""
    source = Path(__file__).resolve().parent.parent
    if (source / "pyproject.toml").is_file() and (source / "configs" / "presets.yaml").is_file():
        return source / "configs"
    from importlib.resources import files

    return Path(str(files("prune.configs")))


@functools.lru_cache(maxsize=1)
def load_presets() -> dict[str, Any]:
    """The shipped ``configs/presets.yaml``."""
    text = (configs_dir() / "presets.yaml").read_text()
    return yaml.safe_load(text)


@dataclass
class PruneConfig:
    """What to prune and how.

    Args:
        method: a name from ``prune.available_methods()``.
        keep: a float in (0, 1] is the fraction of each image's vision tokens to keep
            (T = max(1, round(keep * N))); an int >= 1 is an absolute count per image (capped at N).
        positions: "original" keeps each kept token's position id, "compact" renumbers the kept
            sequence contiguously; None takes the method x family preset (configs/presets.yaml).
        options: method options (see ``prune methods``); unknown names raise TypeError.
        vision_attention: how the vision encoder of a wrapped model runs windowed / per-image attention:
            "segmented" (one FlexAttention call per layer over all windows; Qwen-family encoders),
            "default" (the model's own implementation, e.g. one SDPA call per window), or None:
            segmented for Qwen-family encoders on CUDA that run eager / SDPA, default elsewhere.
        vision_graphs: replay each vision-encoder layer as a CUDA graph (one per layer and input shape,
            captured the second time a shape is seen): layers bound by kernel launches (few rows)
            stop waiting for the host. CUDA only; Qwen-family encoders need ``vision_attention`` segmented.
        vision_compile: run each vision-encoder layer through ``torch.compile`` (one compiled graph for
            all identical layers; inference only): the compiler fuses the small kernels (norms,
            rotary, the MLP's pointwise part). Qwen-family encoders need ``vision_attention`` segmented.
    """

    method: str = "hiprune"
    keep: float | int = 0.33
    positions: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    vision_attention: str | None = None
    vision_graphs: bool = False
    vision_compile: bool = False

    def __post_init__(self) -> None:
        method_cls = get_method(self.method)
        keep = self.keep
        if isinstance(keep, bool) or not isinstance(keep, (int, float)):
            raise TypeError(f"keep must be a float in (0, 1] or an int >= 1, got {keep!r}")
        if isinstance(keep, float) and not 0.0 < keep <= 1.0:
            raise ValueError(f"keep={keep} as a fraction must be in (0, 1]; pass an int for a token count")
        if isinstance(keep, int) and keep < 1:
            raise ValueError(f"keep={keep} as a token count must be >= 1")
        if self.positions is not None and self.positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES} or None, got {self.positions!r}")
        if self.vision_attention is not None and self.vision_attention not in VISION_ATTENTION:
            raise ValueError(
                f"vision_attention must be one of {VISION_ATTENTION} or None, got {self.vision_attention!r}"
            )
        if not isinstance(self.vision_graphs, bool):
            raise TypeError(f"vision_graphs must be True or False, got {self.vision_graphs!r}")
        if not isinstance(self.vision_compile, bool):
            raise TypeError(f"vision_compile must be True or False, got {self.vision_compile!r}")
        method_cls(**self.options)  # validates option names early

    def resolved(self, family: str) -> tuple[str, dict[str, Any]]:
        """(position mode, method options) for a model family, presets under user choices."""
        presets = load_presets()
        family_preset = presets.get("families", {}).get(family, {})
        positions = self.positions or family_preset.get("positions") or presets["default"]["positions"]
        method_cls = get_method(self.method)
        preset_opts = dict(presets.get("methods", {}).get(self.method) or {})
        preset_opts.update((family_preset.get("methods") or {}).get(self.method) or {})
        preset_opts = {k: v for k, v in preset_opts.items() if k in method_cls.defaults}
        return positions, {**preset_opts, **self.options}

    def budget(self, n: int) -> int:
        """Tokens to keep out of ``n`` for one image."""
        if n <= 0:
            return 0
        if isinstance(self.keep, float):
            return max(1, min(n, round(self.keep * n)))
        return min(int(self.keep), n)
