"""The ``prune_shapes`` task: scenes of small coloured shapes, one question about one object.

A scene is a list of objects (shape, colour, centre, radius in fractions of the image side) on a
light background. Every question names an attribute that exactly one object has, and asks for that
object's other attribute, so the answer sits in one small region (about 2 x 2 patches of a 336 px,
14 px-patch encoder): a pruning method that drops that region cannot answer.

``generate_docs()`` is deterministic (a seeded ``random.Random``); the shipped
``prune_shapes.jsonl`` is its output (``python -m prune.evaluation.tasks.shapes`` rewrites it), and
``render_scene`` draws an image from a scene spec alone, so images need no files.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 165, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 195, 30),
    "purple": (140, 60, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (236, 233, 226)
RADIUS = (0.035, 0.055)  # of the image side: 12-18 px at 336 px
N_OBJECTS = 5
N_DOCS = 200
DATA_FILE = Path(__file__).resolve().parent / "prune_shapes.jsonl"


def _place(rng: random.Random, objects: list[dict[str, Any]], r: float) -> tuple[float, float]:
    for _ in range(1000):
        x, y = rng.uniform(r + 0.03, 1 - r - 0.03), rng.uniform(r + 0.03, 1 - r - 0.03)
        if all((x - o["x"]) ** 2 + (y - o["y"]) ** 2 > (r + o["r"] + 0.06) ** 2 for o in objects):
            return x, y
    raise RuntimeError("could not place an object")  # never with 5 small objects


def random_scene(seed: int, n_objects: int = N_OBJECTS) -> list[dict[str, Any]]:
    """``n_objects`` objects with distinct (shape, colour) pairs at non-overlapping places."""
    rng = random.Random(seed)
    pairs = rng.sample([(s, c) for s in SHAPES for c in COLOURS], n_objects)
    objects: list[dict[str, Any]] = []
    for shape, colour in pairs:
        r = round(rng.uniform(*RADIUS), 4)
        x, y = _place(rng, objects, r)
        objects.append({"shape": shape, "colour": colour, "x": round(x, 4), "y": round(y, 4), "r": r})
    return objects


def render_scene(objects: list[dict[str, Any]], size: tuple[int, int] = (336, 336)) -> Image.Image:
    """The scene drawn at ``size`` = (width, height) pixels."""
    width, height = size
    side = min(width, height)
    image = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in objects:
        cx, cy, r = o["x"] * width, o["y"] * height, o["r"] * side
        fill = COLOURS[o["colour"]]
        if o["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif o["shape"] == "square":
            draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def _question(rng: random.Random, objects: list[dict[str, Any]]) -> tuple[str, str, str] | None:
    """(kind, question, answer) about an object whose asked-by attribute is unique, or None."""
    options = []
    for o in objects:
        if sum(p["shape"] == o["shape"] for p in objects) == 1:
            options.append(("colour_of_shape", f"What color is the {o['shape']}?", o["colour"]))
        if sum(p["colour"] == o["colour"] for p in objects) == 1:
            options.append(("shape_of_colour", f"What shape is the {o['colour']} object?", o["shape"]))
    if not options:
        return None
    kind = rng.choice(sorted({o[0] for o in options}))  # both kinds equally often where both exist
    return rng.choice([o for o in options if o[0] == kind])


def generate_docs(n: int = N_DOCS, seed: int = 0) -> list[dict[str, Any]]:
    """The task's documents: id, question, answer, kind and the scene (a JSON string)."""
    rng = random.Random(seed)
    docs: list[dict[str, Any]] = []
    while len(docs) < n:
        scene_seed = rng.randrange(2**31)
        objects = random_scene(scene_seed)
        picked = _question(rng, objects)
        if picked is None:
            continue
        kind, question, answer = picked
        docs.append(
            {
                "id": len(docs),
                "question": question,
                "answer": answer,
                "kind": kind,
                "scene": json.dumps(objects),
            }
        )
    return docs


def write_data_file(path: Path = DATA_FILE) -> Path:
    path.write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in generate_docs()))
    return path


# ---- lmms-eval task functions ----------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lower case, punctuation and leading articles removed, 'grey' read as 'gray'."""
    text = re.sub(r"[^a-z0-9 ]+", " ", str(text).lower())
    words = [w for w in text.split() if w]
    while words and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join("gray" if w == "grey" else w for w in words)


def exact_match(prediction: str, answer: str) -> float:
    return float(normalize(prediction) == normalize(answer))


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [render_scene(json.loads(doc["scene"]))]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question']}{kwargs.get('post_prompt', '')}"


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    return {"exact_match": exact_match(results[0] if results else "", doc["answer"])}


if __name__ == "__main__":
    print(write_data_file())
