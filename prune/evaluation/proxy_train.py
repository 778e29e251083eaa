"""Train the proxy VLM's adapter: the 2-layer MLP projector and rank-8 LoRA deltas on the language
model's linear layers, with the vision encoder and the language model's own weights frozen.

Data (all offline):
- generated grounded-VQA scenes (:mod:`prune.evaluation.tasks.shapes`) from training seeds; every
  scene of the held-out ``prune_shapes`` task (seed 0) is excluded;
- the ``easy-vqa`` train split (its images and questions; the test split is never seen).

Prompts are the ones lmms-eval's chat ``llava_hf`` sends (:func:`prune.evaluation.proxy.prompt` with the
tasks' post prompt); the loss is on the answer and ``<|im_end|>`` only. Deterministic for a seed on one
device. At the end it evaluates the held-out task and the easy-vqa test subset with greedy decoding and
writes ``adapter.safetensors`` and ``train_log.json``::

    python -m prune.evaluation.proxy_train --out prune/evaluation/proxy_weights --device cuda

On one H100 the default run (2,000 steps of 64) takes a few minutes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import proxy
from .tasks import shapes

POST_PROMPT = proxy.POST_PROMPT
EVAL_SEED = 0  # prune_shapes.jsonl is generate_docs(N_DOCS, seed=0)


# ---- data -----------------------------------------------------------------------------------------


def shapes_train_docs(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` generated questions from ``seed`` (not the held-out seed), none on a held-out scene."""
    if seed == EVAL_SEED:
        raise ValueError(f"seed {EVAL_SEED} generates the held-out prune_shapes task; pick another")
    held_out = {d["scene"] for d in shapes.generate_docs(shapes.N_DOCS, seed=EVAL_SEED)}
    docs = [d for d in shapes.generate_docs(n + 50, seed=seed) if d["scene"] not in held_out]
    return docs[:n]


def pack_easyvqa(path: str | Path) -> Path:
    """Write the easy-vqa train split and the prune_easyvqa test questions to one ``.npz`` (uint8
    images, questions, answers), for a machine without the package."""
    import easy_vqa
    from PIL import Image

    from .tasks import easyvqa

    def images(paths: dict[int, str], ids: list[int]) -> np.ndarray:
        return np.stack([np.asarray(Image.open(paths[i]).convert("RGB")) for i in ids])

    texts, answers, image_ids = easy_vqa.get_train_questions()
    train_paths = easy_vqa.get_train_image_paths()
    uniq = sorted(set(image_ids))
    index = {i: k for k, i in enumerate(uniq)}
    test_texts, test_answers, test_ids = easy_vqa.get_test_questions()
    test_paths = easy_vqa.get_test_image_paths()
    qids = [json.loads(line)["qid"] for line in easyvqa.DATA_FILE.read_text().splitlines() if line.strip()]
    path = Path(path)
    np.savez_compressed(
        path,
        train_images=images(train_paths, uniq),
        train_image_index=np.array([index[i] for i in image_ids]),
        train_questions=np.array(texts),
        train_answers=np.array(answers),
        test_images=images(test_paths, [test_ids[q] for q in qids]),
        test_questions=np.array([test_texts[q] for q in qids]),
        test_answers=np.array([test_answers[q] for q in qids]),
    )
    return path


def load_easyvqa(npz: str | Path | None) -> dict[str, Any]:
    """The arrays of :func:`pack_easyvqa` (packed from the installed package when ``npz`` is None)."""
    if npz is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="prune-easyvqa-") as tmp:
            return load_easyvqa(pack_easyvqa(Path(tmp) / "easyvqa.npz"))
    with np.load(npz) as data:
        return {k: data[k] for k in data.files}


# ---- LoRA -----------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """``base(x) + scale * B(A(x))`` with B initialised to zero (the model starts as the base)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        a = torch.empty(rank, base.in_features)
        bound = 1 / math.sqrt(base.in_features)
        a.uniform_(-bound, bound, generator=generator)
        self.A = nn.Parameter(a)
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * nn.functional.linear(nn.functional.linear(x, self.A.to(x.dtype)), self.B.to(x.dtype))


def add_lora(model: nn.Module, rank: int, alpha: float, seed: int) -> dict[str, LoRALinear]:
    generator = torch.Generator().manual_seed(seed)
    out = {}
    lm = model.model.language_model
    for name, linear in proxy.lora_targets(model).items():
        path = name[len("language_model.") :]
        parent = lm.get_submodule(path.rsplit(".", 1)[0])
        wrapped = LoRALinear(linear, rank, alpha, generator).to(linear.weight.device)
        setattr(parent, path.rsplit(".", 1)[1], wrapped)
        out[name] = wrapped
    return out


def save_adapter(model: nn.Module, loras: dict[str, LoRALinear], path: Path, meta: dict[str, Any]) -> Path:
    from safetensors.torch import save_file

    tensors = {
        f"projector.{k}": v.detach().to(torch.float16).cpu().contiguous()
        for k, v in model.model.multi_modal_projector.named_parameters()
    }
    for name, lora in loras.items():
        tensors[f"lora.{name}.A"] = lora.A.detach().to(torch.float16).cpu().contiguous()
        tensors[f"lora.{name}.B"] = lora.B.detach().to(torch.float16).cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={k: str(v) for k, v in meta.items()})
    return path


# ---- batches --------------------------------------------------------------------------------------


class Encoder:
    """Prompts + answers -> padded input ids, attention mask and labels (answer and <|im_end|> only)."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.end = "<|im_end|>"

    def prompt_text(self, question: str) -> str:
        """The chat prompt with its ``<image>`` expanded to the image's tokens (as the processor does)."""
        text = proxy.prompt(self.processor, question, post_prompt=POST_PROMPT)
        return text.replace(proxy.IMAGE_TOKEN, proxy.IMAGE_TOKEN * proxy.IMAGE_TOKENS)

    def prompt_ids(self, question: str) -> list[int]:
        return self.tokenizer(self.prompt_text(question), add_special_tokens=False)["input_ids"]

    def answer_ids(self, answer: str) -> list[int]:
        return self.tokenizer(answer + self.end, add_special_tokens=False)["input_ids"]


def collate(prompts: list[list[int]], answers: list[list[int]], pad_id: int):
    seqs = [p + a for p, a in zip(prompts, answers)]
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    labels = torch.full((len(seqs), length), -100, dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts, answers)):
        n = len(p) + len(a)
        ids[i, :n] = torch.tensor(p + a)
        mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(a)
    return ids, mask, labels


def pixels(processor, images: list, chunk: int = 256) -> torch.Tensor:
    out = []
    for i in range(0, len(images), chunk):
        out.append(processor.image_processor(images[i : i + chunk], return_tensors="pt")["pixel_values"])
    return torch.cat(out)


@torch.no_grad()
def evaluate(model, processor, pixel_values: torch.Tensor, questions: list[str], answers: list[str], batch: int = 64) -> float:
    """Greedy exact-match accuracy (the tasks' metric) with left-padded batches."""
    device = next(model.parameters()).device
    encoder = Encoder(processor)
    hits = 0
    for i in range(0, len(questions), batch):
        enc = processor.tokenizer(
            [encoder.prompt_text(q) for q in questions[i : i + batch]],
            return_tensors="pt", padding=True, add_special_tokens=False,
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                pixel_values=pixel_values[i : i + batch].to(device),
                max_new_tokens=6,
                do_sample=False,
            )
        preds = processor.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        hits += sum(shapes.exact_match(p, a) for p, a in zip(preds, answers[i : i + batch]))
    return hits / max(1, len(questions))


def answer_loss(model, ids, mask, pixel_values, labels) -> torch.Tensor:
    """Next-token cross entropy on the labelled positions only: the LM head runs on those few rows
    instead of every position (its 49k-wide logits dominate a full forward's memory and time)."""
    hidden = model.model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values).last_hidden_state
    target = labels[:, 1:]
    picked = target != -100
    logits = model.lm_head(hidden[:, :-1][picked])
    return nn.functional.cross_entropy(logits.float(), target[picked])


# ---- training ---------------------------------------------------------------------------------------


def train(
    *,
    out: Path,
    cache: str | None = None,
    parts: dict[str, Path] | None = None,
    eval_limit: int | None = None,
    easyvqa_npz: str | None = None,
    device: str = "cuda",
    steps: int = 2000,
    batch: int = 64,
    n_shapes: int = 20000,
    shapes_fraction: float = 0.75,
    rank: int = 8,
    alpha: float = 16.0,
    lr_projector: float = 1e-3,
    lr_lora: float = 4e-4,
    warmup: int = 100,
    seed: int = 1,
    time_budget: float | None = None,
    log=print,
) -> dict[str, Any]:
    t0 = time.time()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    dev = torch.device(device)
    model, processor = proxy.build_proxy(parts, cache=cache, adapter=None)
    model.requires_grad_(False)
    model.to(dev)
    loras = add_lora(model, rank, alpha, seed)
    params_projector = list(model.model.multi_modal_projector.parameters())
    params_lora = [p for lora in loras.values() for p in (lora.A, lora.B)]
    for p in params_projector + params_lora:
        p.requires_grad_(True)
    log(f"model ready in {time.time() - t0:.0f}s; trainable {sum(p.numel() for p in params_projector + params_lora) / 1e6:.2f}M")

    # data: images processed once, kept on the device as bfloat16
    docs = shapes_train_docs(n_shapes, seed)
    easy = load_easyvqa(easyvqa_npz)
    from PIL import Image

    shape_pixels = pixels(processor, [shapes.doc_to_visual(d)[0] for d in docs]).to(dev, torch.bfloat16)
    easy_pixels = pixels(processor, [Image.fromarray(a) for a in easy["train_images"]]).to(dev, torch.bfloat16)
    enc = Encoder(processor)
    easy_q = [str(q) for q in easy["train_questions"]]
    prompt_cache = {q: enc.prompt_ids(q) for q in sorted({d["question"] for d in docs} | set(easy_q))}
    answer_cache = {a: enc.answer_ids(a) for a in sorted({d["answer"] for d in docs} | {str(a) for a in easy["train_answers"]})}
    shape_prompts = [prompt_cache[d["question"]] for d in docs]
    shape_answers = [answer_cache[d["answer"]] for d in docs]
    easy_prompts = [prompt_cache[q] for q in easy_q]
    easy_answers = [answer_cache[str(a)] for a in easy["train_answers"]]
    easy_index = torch.as_tensor(easy["train_image_index"])
    log(f"data ready in {time.time() - t0:.0f}s: {len(docs)} scene questions, {len(easy_q)} easy-vqa questions")

    optimizer = torch.optim.AdamW(
        [{"params": params_projector, "lr": lr_projector}, {"params": params_lora, "lr": lr_lora}],
        weight_decay=0.0,
        betas=(0.9, 0.98),
    )
    base_lrs = [lr_projector, lr_lora]
    rng = np.random.default_rng(seed)
    pad_id = processor.tokenizer.pad_token_id
    model.train()
    losses = []
    t_train = time.time()
    step = 0
    while step < steps:
        if step == 10:
            t_ten = time.time()
        if time_budget is not None and step == 30:
            # fit the run into the budget: the step count (and so the schedule) is fixed here, once,
            # and logged; rerunning with --steps <that count> reproduces the run
            per_step = (time.time() - t_ten) / 20
            steps = max(step + 1, min(steps, int(time_budget / per_step)))
            log(f"{per_step * 1000:.0f} ms/step: {steps} steps fit the {time_budget:.0f}s budget")
        scale = min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group, lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * scale
        n_s = int(round(batch * shapes_fraction))
        si = rng.integers(0, len(docs), n_s)
        ei = rng.integers(0, len(easy_q), batch - n_s)
        prompts = [shape_prompts[i] for i in si] + [easy_prompts[i] for i in ei]
        answers = [shape_answers[i] for i in si] + [easy_answers[i] for i in ei]
        ids, mask, labels = collate(prompts, answers, pad_id)
        pv = torch.cat([shape_pixels[torch.as_tensor(si, device=dev)], easy_pixels[easy_index[ei].to(dev)]])
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = answer_loss(model, ids.to(dev), mask.to(dev), pv, labels.to(dev))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_projector + params_lora, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {np.mean(losses[-100:]):.4f}  {time.time() - t_train:.0f}s")
        step += 1
    train_seconds = time.time() - t_train
    model.eval()

    meta = {
        "format": "prune.proxy-adapter/1",
        "lora_rank": rank,
        "lora_alpha": alpha,
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "shapes_fraction": shapes_fraction,
        "n_shapes": len(docs),
        "n_easyvqa": len(easy_q),
    }
    path = save_adapter(model, loras, Path(out) / "adapter.safetensors", meta)

    # held-out accuracy, from the saved adapter merged into a fresh model (what users load)
    del model, optimizer
    fresh, processor = proxy.build_proxy(parts, cache=cache, adapter=path)
    fresh.to(dev)
    held = shapes.generate_docs(shapes.N_DOCS, seed=EVAL_SEED)[:eval_limit]
    held_pixels = pixels(processor, [shapes.doc_to_visual(d)[0] for d in held])
    acc_shapes = evaluate(fresh, processor, held_pixels, [d["question"] for d in held], [d["answer"] for d in held])
    test = slice(0, eval_limit)
    test_pixels = pixels(processor, [Image.fromarray(a) for a in easy["test_images"][test]])
    acc_easy = evaluate(
        fresh, processor, test_pixels,
        [str(q) for q in easy["test_questions"][test]], [str(a) for a in easy["test_answers"][test]],
    )
    report = {
        **meta,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "final_loss": float(np.mean(losses[-100:])),
        "loss_curve": [round(float(np.mean(losses[i : i + 50])), 4) for i in range(0, len(losses), 50)],
        "heldout_prune_shapes_accuracy": acc_shapes,
        "heldout_easyvqa_accuracy": acc_easy,
        "adapter_bytes": path.stat().st_size,
        "torch": torch.__version__,
    }
    (Path(out) / "train_log.json").write_text(json.dumps(report, indent=2) + "\n")
    log(json.dumps({k: v for k, v in report.items() if k != "loss_curve"}, indent=2))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m prune.evaluation.proxy_train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=proxy.ADAPTER_DIR)
    ap.add_argument("--cache", help="folder holding the fetched parts (default: prune proxy fetch's)")
    ap.add_argument("--easyvqa-npz", help="pack_easyvqa's file (default: pack it from the easy-vqa package)")
    ap.add_argument("--pack-easyvqa", type=Path, metavar="PATH", help="only write the easy-vqa pack and exit")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n-shapes", type=int, default=20000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--time-budget", type=float, help="seconds of training: fewer steps if they do not fit")
    ap.add_argument("--eval-limit", type=int, help="evaluate only the first N questions of each held-out set")
    ap.add_argument("--vision", type=Path, help="the vision part (.onnx, or a .safetensors port of it)")
    ap.add_argument("--language", type=Path, help="the language part (.gguf)")
    args = ap.parse_args(argv)
    parts = None
    if args.vision or args.language:
        parts = {**proxy.locate_parts(args.cache)} if not (args.vision and args.language) else {}
        parts.update({k: v for k, v in (("vision", args.vision), ("language", args.language)) if v})
    if args.pack_easyvqa:
        print(pack_easyvqa(args.pack_easyvqa))
        return 0
    train(
        out=args.out, cache=args.cache, parts=parts, eval_limit=args.eval_limit, time_budget=args.time_budget, easyvqa_npz=args.easyvqa_npz, device=args.device,
        steps=args.steps, batch=args.batch, n_shapes=args.n_shapes, seed=args.seed,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
