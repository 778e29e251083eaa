"""The ``prune_easyvqa`` task: easy-VQA test questions (shapes of one colour on 64 px images).

The shipped ``prune_easyvqa.jsonl`` lists which questions to use (every 25th of the test split,
387 questions); their text, answers and images come from the installed ``easy-vqa`` package
(``pip install easy-vqa``, part of ``vlm-prune[eval]``), so no data is copied here.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from PIL import Image

from .shapes import doc_to_text, exact_match

STRIDE = 25
DATA_FILE = Path(__file__).resolve().parent / "prune_easyvqa.jsonl"


@functools.lru_cache(maxsize=1)
def _package():
    try:
        import easy_vqa
    except ImportError:
        raise ImportError("the prune_easyvqa task needs the easy-vqa package: pip install easy-vqa") from None
    texts, answers, image_ids = easy_vqa.get_test_questions()
    return texts, answers, image_ids, easy_vqa.get_test_image_paths()


def write_data_file(path: Path = DATA_FILE) -> Path:
    n = len(_package()[0])
    rows = [{"qid": q} for q in range(0, n, STRIDE)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _join(doc: dict[str, Any]) -> dict[str, Any]:
    texts, answers, image_ids, paths = _package()
    q = int(doc["qid"])
    return {"qid": q, "question": texts[q], "answer": answers[q], "image_path": paths[image_ids[q]]}


def process_docs(dataset):
    """lmms-eval hook: add question, answer and image path from the easy-vqa package."""
    _package()  # a clear error before datasets' map if the package is missing
    return dataset.map(_join)


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    with Image.open(doc["image_path"]) as image:
        return [image.convert("RGB")]


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": exact_match(results[0] if results else "", doc["answer"])}


__all__ = ["doc_to_text", "doc_to_visual", "process_docs", "process_results", "write_data_file"]

if __name__ == "__main__":
    print(write_data_file())
