"""Model-family adapters, dispatched on the model's class name."""

from __future__ import annotations

from torch import nn

from .base import Adapter, ImageLayout
from .gemma3 import Gemma3Adapter
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen2_5_omni import Qwen25OmniAdapter
from .qwen2_5_vl import Qwen25VLAdapter
from .qwen2_vl import Qwen2VLAdapter
from .qwen3_5 import Qwen35Adapter
from .qwen3_vl import Qwen3VLAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaNextVideoAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Qwen25VLAdapter,
    Qwen25OmniAdapter,
    Qwen3VLAdapter,
    Gemma3Adapter,
    InternVLAdapter,
    Qwen35Adapter,
)


def adapter_for(model: nn.Module) -> Adapter:
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.model_classes:
            return adapter(model)
    supported = ", ".join(supported_classes())
    raise TypeError(f"prune does not support {name}; supported model classes: {supported}")


def supported_classes() -> dict[str, str]:
    """Model class name -> family, for the classes the installed transformers has (a family whose
    classes an older release lacks is simply absent)."""
    import transformers

    return {c: a.family for a in ADAPTERS for c in a.model_classes if hasattr(transformers, c)}


__all__ = ["ADAPTERS", "Adapter", "ImageLayout", "adapter_for", "supported_classes"]
