"""Shared by the diagnostics: command-line options (``--name value`` pairs, the type of the default)
and the batch of images and prompts they build (a shipped model shape with random weights)."""
import sys

import torch

from prune.evaluation import models as M
from prune.evaluation.tasks.shapes import random_scene, render_scene


def arg(name, default):
    return type(default)(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


def keep_arg(default: float) -> float | int:
    """``--keep``: a fraction, or a token count (an integer above 1)."""
    value = arg("--keep", default)
    return int(value) if value > 1 and value == int(value) else value


def image_batch(model_name: str, batch: int):
    """(spec, device, dtype, model, inputs): the model (bf16 SDPA on a GPU, fp32 on a CPU) and ``batch``
    prompts of 64 text tokens with one rendered scene each."""
    spec = M.resolve_model(model_name)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    model = M.build_model(spec, device=dev, dtype=dt, attn_implementation="sdpa", seed=0)
    images = [render_scene(random_scene(b), size=spec.image_size[::-1]) for b in range(batch)]
    inputs = M.make_inputs(model, M.build_image_processor(spec), images, prompt_tokens=64, seed=0, device=dev,
                           dtype=dt, spec=spec)
    return spec, dev, dt, model, inputs
