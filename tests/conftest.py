import re

import pytest
import torch

from prune._tiny import build_prompts, image_token_counts, tiny_llava, tiny_llava_next

torch.set_num_threads(2)


class Case:
    """A model with inputs for a batch of prompts."""

    def __init__(self, family, attn="eager", prompts=((1,),), text_lens=(10,), seed=0, text_layers=2):
        self.family = family
        single_grid = family in ("llava", "llava_dinov2")  # one 8x8 patch grid per image
        if single_grid:
            vision = "dinov2" if family == "llava_dinov2" else "clip"  # dinov2: the proxy VLM's encoder
            self.model = tiny_llava(attn_implementation=attn, text_layers=text_layers, vision=vision)
        else:
            self.model = tiny_llava_next(attn_implementation=attn, text_layers=text_layers)
        gen = torch.Generator().manual_seed(seed)
        self.prompts = prompts  # per prompt: a tuple of image "kinds" (index into sizes for next)
        n_images = sum(len(p) for p in prompts)
        if single_grid:
            self.pixel_values = torch.randn(n_images, 3, 32, 32, generator=gen)
            self.image_sizes = None
        else:
            sizes = [(16, 16), (16, 40), (30, 16), (32, 30)]
            kinds = [k for p in prompts for k in p]
            self.image_sizes = torch.tensor([sizes[k % len(sizes)] for k in kinds])
            self.pixel_values = torch.randn(n_images, 5, 3, 16, 16, generator=gen)
        counts = image_token_counts(self.model, self.pixel_values, self.image_sizes)
        it = iter(counts)
        self.counts = [[next(it) for _ in p] for p in prompts]
        self.input_ids, self.attention_mask = build_prompts(self.counts, list(text_lens), seed=seed)

    def inputs(self, rows=None):
        if rows is None:
            rows = list(range(len(self.prompts)))
        # images of the chosen rows, in order
        starts = [0]
        for p in self.prompts:
            starts.append(starts[-1] + len(p))
        img = [i for r in rows for i in range(starts[r], starts[r + 1])]
        ids, mask = self.input_ids[rows], self.attention_mask[rows]
        # drop columns that are padding in every chosen row
        first = int(mask.argmax(1).min()) if mask.any(1).all() else 0
        out = {"input_ids": ids[:, first:], "attention_mask": mask[:, first:]}
        if img:
            out["pixel_values"] = self.pixel_values[img]
            if self.image_sizes is not None:
                out["image_sizes"] = self.image_sizes[img]
        return out


@pytest.fixture
def make_case():
    return Case


# The model contracts: CI runs these again on the oldest supported transformers (`-m contract`).
_CONTRACT = re.compile(r"identity|oracle|batch_equals_singles|eager_and_sdpa|kv_cache_holds|generate|version|tested")


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = getattr(item, "originalname", None) or item.name
        if _CONTRACT.search(name) or item.module.__name__.endswith("test_versions"):
            item.add_marker(pytest.mark.contract)
