"""Model shapes for benchmarks: shipped configs (``configs/models/*.yaml``), random weights built
straight on a device, real weights from a local folder, and inputs of the right layout.

A shape file names a transformers class, the kwargs of its config, and the image processor that
lays an image out the way the model expects (views, crops, patch grids). Everything that depends on
the family (how many placeholder tokens an image needs, which ids surround them) is read off the
model and the processor at run time, so a new family is one YAML file::

    name: my-model
    architecture: SomeForConditionalGeneration      # a transformers class
    config: {model_type: ..., vision_config: {...}, text_config: {...}}
    processor: {class: SomeImageProcessor, kwargs: {...}, from_config: [keys copied from config]}
    inputs: {image_size: [height, width]}
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class ModelSpecError(ValueError):
    """A model name, path or shape file that cannot be used (the CLI turns it into exit code 2)."""


@dataclass
class ModelSpec:
    """One model shape (from ``configs/models``) or a local pretrained folder (``path`` set)."""

    name: str
    architecture: str
    config: dict[str, Any] = field(default_factory=dict)
    processor: dict[str, Any] = field(default_factory=dict)
    inputs: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: Path | None = None  # a pretrained folder: real weights and its own processor

    @property
    def pretrained(self) -> bool:
        return self.path is not None

    @property
    def image_size(self) -> tuple[int, int]:
        h, w = self.inputs.get("image_size", [336, 336])
        return int(h), int(w)


def _models_dir() -> Path:
    from ..config import configs_dir

    return configs_dir() / "models"


def shipped_models() -> dict[str, Path]:
    """Shape name -> YAML file, for every file in ``configs/models``."""
    return {p.stem: p for p in sorted(_models_dir().glob("*.yaml"))}


def _spec_from_yaml(path: Path) -> ModelSpec:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ModelSpecError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict) or "architecture" not in data or "config" not in data:
        raise ModelSpecError(f"{path}: a model shape needs 'architecture' and 'config' keys")
    return ModelSpec(
        name=str(data.get("name", path.stem)),
        architecture=str(data["architecture"]),
        config=dict(data["config"]),
        processor=dict(data.get("processor") or {}),
        inputs=dict(data.get("inputs") or {}),
        description=str(data.get("description", "")),
    )


def resolve_model(name: str) -> ModelSpec:
    """A shipped shape name (``llava-1.5-7b``), a shape YAML file, or a pretrained folder."""
    shipped = shipped_models()
    if name in shipped:
        return _spec_from_yaml(shipped[name])
    path = Path(name).expanduser()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return _spec_from_yaml(path)
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelSpecError(f"{path} has no config.json: not a pretrained model folder")
        import json

        config = json.loads(config_file.read_text())
        archs = config.get("architectures") or []
        if not archs:
            raise ModelSpecError(f"{config_file} names no 'architectures'")
        return ModelSpec(name=path.name, architecture=archs[0], config=config, path=path)
    raise ModelSpecError(
        f"unknown model {name!r}: give a shape ({', '.join(shipped)}), a shape .yaml file, "
        "or a local folder with config.json"
    )


def _model_class(spec: ModelSpec) -> type[nn.Module]:
    import transformers

    cls = getattr(transformers, spec.architecture, None)
    if cls is None:
        raise ModelSpecError(
            f"transformers {transformers.__version__} has no class {spec.architecture!r} (model {spec.name})"
        )
    return cls


def _check_keys(config_cls, kwargs: dict[str, Any], where: str) -> None:
    """Reject keys a config class does not declare (configs swallow unknown kwargs silently)."""
    import dataclasses

    from transformers import CONFIG_MAPPING

    if not dataclasses.is_dataclass(config_cls):  # older transformers: nothing reliable to check against
        return
    known = {f.name for f in dataclasses.fields(config_cls)} | {"model_type"}
    known |= set(inspect.signature(config_cls.__init__).parameters) | set(
        getattr(config_cls, "attribute_map", {})
    )
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ModelSpecError(f"{where}: {config_cls.__name__} has no field(s) {', '.join(unknown)}")
    for name, sub in (getattr(config_cls, "sub_configs", None) or {}).items():
        value = kwargs.get(name)
        if isinstance(value, dict):
            sub_cls = CONFIG_MAPPING.get(value["model_type"]) if "model_type" in value else sub
            if sub_cls is not None and isinstance(sub_cls, type):
                _check_keys(sub_cls, value, f"{where}.{name}")


def build_config(spec: ModelSpec):
    """The transformers config object of a shape."""
    from transformers import CONFIG_MAPPING

    kwargs = dict(spec.config)
    model_type = kwargs.pop("model_type", None)
    if model_type not in CONFIG_MAPPING:
        raise ModelSpecError(f"{spec.name}: unknown config model_type {model_type!r}")
    _check_keys(CONFIG_MAPPING[model_type], kwargs, spec.name)
    return CONFIG_MAPPING[model_type](**kwargs)


def _materialize(model: nn.Module, device: torch.device) -> None:
    """Move a model whose parameters live on the meta device to ``device`` without copying values:
    parameters get fresh (uninitialized) storage there, real buffers (e.g. RoPE inverse frequencies
    computed at construction) keep their values."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)


class _ParametersOnMeta:
    """Construct modules with their parameters on the meta device and buffers where they would be."""

    def __enter__(self):
        self._original = nn.Module.register_parameter

        def register_parameter(module, name, param):
            self._original(module, name, param)
            if param is not None and param.device.type != "meta":
                kwargs = {"requires_grad": param.requires_grad}
                module._parameters[name] = type(param)(module._parameters[name].to("meta"), **kwargs)

        nn.Module.register_parameter = register_parameter
        return self

    def __exit__(self, *exc):
        nn.Module.register_parameter = self._original
        return False


def build_model(
    spec: ModelSpec,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    attn_implementation: str = "sdpa",
    seed: int = 0,
) -> nn.Module:
    """The model of ``spec`` in eval mode on ``device``.

    A shape gets random weights: its parameters are created on the meta device, given storage on
    ``device`` and initialized there by the model's own ``init_weights`` (a 7B model is up in seconds
    on a GPU, with no host copy). A pretrained folder loads its weights (local files only).
    """
    device = torch.device(device)
    cls = _model_class(spec)
    if spec.pretrained:
        model = cls.from_pretrained(
            spec.path, dtype=dtype, attn_implementation=attn_implementation, local_files_only=True
        ).to(device)
        return model.eval()
    config = build_config(spec)
    config._attn_implementation = attn_implementation
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters and float buffers in the target dtype, as from_pretrained
    try:
        with _ParametersOnMeta():
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    _materialize(model, device)
    for module in model.modules():  # construction "initialized" the meta tensors: do it for real now
        module.__dict__.pop("_is_hf_initialized", None)
    torch.manual_seed(seed)
    model.init_weights()
    if getattr(model, "generation_config", None) is not None:
        text = config.get_text_config()
        model.generation_config.pad_token_id = getattr(text, "pad_token_id", None) or 0
    return model.eval()


def build_image_processor(spec: ModelSpec):
    """The image processor of a shape (built in code) or of a pretrained folder (loaded locally)."""
    if spec.pretrained:
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(spec.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelSpecError(f"{spec.path}: no image processor saved there ({exc})") from None
    import transformers

    name = spec.processor.get("class")
    if not name:
        raise ModelSpecError(f"{spec.name}: the shape file names no processor class")
    cls = getattr(transformers, name, None)
    if cls is None:
        raise ModelSpecError(f"transformers has no image processor {name!r} (model {spec.name})")
    kwargs = dict(spec.processor.get("kwargs") or {})
    for key in spec.processor.get("from_config") or []:
        kwargs.setdefault(key, spec.config[key])
    return cls(**kwargs)


# ---- inputs ---------------------------------------------------------------------------------------


def _config_id(config, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    return None


def pixel_inputs(image_processor, images: list) -> dict[str, torch.Tensor]:
    """Processor outputs for a list of PIL images (pixel_values and the grid/size tensors)."""
    out = image_processor(images=images, return_tensors="pt")
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


def feature_counts(model: nn.Module, pixels: dict[str, torch.Tensor], modality: str = "image") -> list[int]:
    """Placeholder tokens each image (video) needs: the rows the model's own encoder returns."""
    name = "get_image_features" if modality == "image" else "get_video_features"
    mm = model.model if hasattr(model, "model") and hasattr(model.model, name) else model
    fn = getattr(mm, name, None)
    if fn is None:
        raise ModelSpecError(f"{type(model).__name__} takes no {modality} input")
    params = inspect.signature(fn).parameters
    kwargs = {k: v for k, v in pixels.items() if k in params}
    with torch.no_grad():
        out = fn(**kwargs)
    feats = getattr(out, "pooler_output", out)
    if isinstance(feats, torch.Tensor):
        if feats.dim() == 3:  # (images, tokens, dim)
            return [feats.shape[1]] * feats.shape[0]
        grid = pixels.get("image_grid_thw" if modality == "image" else "video_grid_thw")  # (sum tokens, dim)
        if grid is None:
            raise RuntimeError("cannot split the image features per image")
        merge = int(getattr(model.config.vision_config, "spatial_merge_size", 1))
        return [int(t * h * w) // (merge * merge) for t, h, w in grid.tolist()]
    return [int(f.shape[0]) for f in feats]


def text_inputs(
    model: nn.Module,
    counts: list[int],
    *,
    prompt_tokens: int = 64,
    seed: int = 0,
    vision_start_token_id: int | None = None,
    vision_end_token_id: int | None = None,
    modality: str = "image",
) -> dict[str, torch.Tensor]:
    """input_ids (and mm_token_type_ids where the model takes them) for one prompt per image:
    ``prompt_tokens`` random text tokens around the image's placeholder tokens (and the vision
    start/end tokens where the family has them). All prompts have the same length when the
    counts are equal; otherwise they are left padded."""
    config = model.config
    names = (
        ("image_token_id", "image_token_index")
        if modality == "image"
        else ("video_token_id", "video_token_index")
    )
    image_id = _config_id(config, *names)
    if image_id is None:
        raise ModelSpecError(f"{type(model).__name__}'s config names no {modality} token id")
    type_code = 1 if modality == "image" else 2
    start = (
        vision_start_token_id
        if vision_start_token_id is not None
        else _config_id(config, "vision_start_token_id")
    )
    end = (
        vision_end_token_id if vision_end_token_id is not None else _config_id(config, "vision_end_token_id")
    )
    text = config.get_text_config()
    vocab = int(text.vocab_size)
    bos = getattr(text, "bos_token_id", None)
    # every modality's placeholder is special: a stray video token in an image prompt is a video token
    others = [
        _config_id(config, "image_token_id", "image_token_index"),
        _config_id(config, "video_token_id", "video_token_index"),
        _config_id(config, "audio_token_id", "audio_token_index"),
    ]
    special = {
        i for i in (image_id, *others, start, end, bos, getattr(text, "eos_token_id", None)) if isinstance(i, int)
    }
    gen = torch.Generator().manual_seed(seed)
    low, high = min(10, vocab // 4), min(vocab, 30000)
    rows, types = [], []
    for n in counts:
        words = [
            w
            for w in torch.randint(low, high, (prompt_tokens + 8,), generator=gen).tolist()
            if w not in special
        ]
        words = words[:prompt_tokens]
        head, tail = words[: len(words) // 4], words[len(words) // 4 :]
        row = ([bos] if isinstance(bos, int) else []) + head
        typ = [0] * len(row)
        if start is not None:
            row, typ = row + [start], typ + [0]
        row, typ = row + [image_id] * n, typ + [type_code] * n
        if end is not None:
            row, typ = row + [end], typ + [0]
        rows.append(row + tail)
        types.append(typ + [0] * len(tail))
    length = max(len(r) for r in rows)
    pad = getattr(text, "pad_token_id", None) or 0
    out = {
        "input_ids": torch.full((len(rows), length), int(pad), dtype=torch.long),
        "attention_mask": torch.zeros(len(rows), length, dtype=torch.long),
    }
    mm_types = torch.zeros(len(rows), length, dtype=torch.long)
    for b, (row, typ) in enumerate(zip(rows, types)):
        out["input_ids"][b, length - len(row) :] = torch.tensor(row)
        out["attention_mask"][b, length - len(row) :] = 1
        mm_types[b, length - len(row) :] = torch.tensor(typ)
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        out["mm_token_type_ids"] = mm_types
    return out


def make_inputs(
    model: nn.Module,
    image_processor,
    images: list,
    *,
    prompt_tokens: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    spec: ModelSpec | None = None,
) -> dict[str, torch.Tensor]:
    """Model inputs for one prompt per image: pixels from the processor, ids with the right number of
    placeholder tokens. Floating tensors are cast to ``dtype``; everything moves to ``device``."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = dtype or next(model.parameters()).dtype
    pixels = pixel_inputs(image_processor, images)
    pixels = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in pixels.items()}
    counts = feature_counts(model, pixels)
    extra = {
        k: int(spec.inputs[k])
        for k in ("vision_start_token_id", "vision_end_token_id")
        if spec and k in spec.inputs
    }
    ids = text_inputs(model, counts, prompt_tokens=prompt_tokens, seed=seed, **extra)
    # what the model's forward takes by name (InternVL's processor also returns num_patches, which
    # the model reads off the prompt instead and generate refuses)
    params = inspect.signature(model.forward).parameters
    pixels = {k: v for k, v in pixels.items() if k in params}
    return {**{k: v.to(device) for k, v in ids.items()}, **pixels}


def build_video_processor(spec: ModelSpec):
    """The video processor of a shape (its ``video_processor`` section) or of a pretrained folder."""
    if spec.pretrained:
        from transformers import AutoVideoProcessor

        try:
            return AutoVideoProcessor.from_pretrained(spec.path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelSpecError(f"{spec.path}: no video processor saved there ({exc})") from None
    import transformers

    section = spec.processor.get("video") or {}
    cls = getattr(transformers, section.get("class", ""), None)
    if cls is None:
        raise ModelSpecError(f"{spec.name}: the shape file names no video processor (processor.video.class)")
    return cls(**(section.get("kwargs") or {}))


def make_video_inputs(
    model: nn.Module,
    spec: ModelSpec,
    frames: list,
    *,
    prompt_tokens: int = 8,
    seed: int = 0,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    copies: int = 1,
) -> dict[str, torch.Tensor]:
    """Model inputs for ``copies`` prompts, each holding the video (a list of PIL frames)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    dtype = dtype or next(model.parameters()).dtype
    processor = build_video_processor(spec)
    out = processor(videos=[frames] * copies, return_tensors="pt")
    pixels = {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}
    pixels = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in pixels.items()}
    counts = feature_counts(model, pixels, "video")
    extra = {
        k: int(spec.inputs[k]) for k in ("vision_start_token_id", "vision_end_token_id") if k in spec.inputs
    }
    ids = text_inputs(model, counts, prompt_tokens=prompt_tokens, seed=seed, modality="video", **extra)
    return {**{k: v.to(device) for k, v in ids.items()}, **pixels}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
