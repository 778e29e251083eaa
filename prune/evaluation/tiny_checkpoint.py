"""A tiny random LLaVA saved as a real Hugging Face checkpoint (weights, tokenizer, processor, chat
template), so the lmms-eval bridge can be run end to end offline::

    python -m prune.evaluation.tiny_checkpoint ./tiny-llava
    python -m lmms_eval --model pruned --model_args base=llava_hf,pretrained=./tiny-llava,... --device cpu

Its weights are random: answers are noise, token counts and timings are real. The tokenizer is a
small BPE trained here on the prompts of the shipped tasks, with ``<image>`` as a special token.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}</s>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]


def _corpus() -> list[str]:
    from .tasks.shapes import COLOURS, SHAPES, generate_docs

    lines = [d["question"] for d in generate_docs()]
    lines += ["Answer the question using a single word.", "USER: ASSISTANT:", "yes no"]
    lines += [" ".join(COLOURS), " ".join(SHAPES), "gray black teal brown rectangle"]
    return lines


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained on the task prompts, wrapped as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )


def save_tiny_llava(out_dir: str | Path, *, image_size: int = 64, patch: int = 8, seed: int = 0) -> Path:
    """Write a tiny LLaVA-1.5-shaped checkpoint with its processor to ``out_dir``; returns the path."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    vocab = len(tokenizer)
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    torch.manual_seed(seed)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=image_size,
            patch_size=patch,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        ),
        image_token_id=image_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prune.evaluation.tiny_checkpoint",
        description="Save a tiny random LLaVA checkpoint with its processor (offline, a few seconds).",
    )
    parser.add_argument("out", help="folder to write (created if missing)")
    args = parser.parse_args(argv)
    print(save_tiny_llava(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
