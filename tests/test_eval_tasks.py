"""The shipped offline lmms-eval tasks: deterministic data, answers that depend on one object, metric."""

import json

import pytest
import yaml

from prune.evaluation.tasks import TASKS_DIR, easyvqa, shapes


def test_shipped_shapes_data_is_what_the_generator_makes():
    shipped = [json.loads(line) for line in shapes.DATA_FILE.read_text().splitlines()]
    assert shipped == shapes.generate_docs()
    assert len(shipped) == shapes.N_DOCS
    assert {d["kind"] for d in shipped} == {"colour_of_shape", "shape_of_colour"}


def test_each_question_is_answered_by_exactly_one_object():
    for doc in shapes.generate_docs(50):
        objects = json.loads(doc["scene"])
        if doc["kind"] == "colour_of_shape":
            named = [o for o in objects if f"the {o['shape']}?" in doc["question"]]
            assert len(named) == 1 and named[0]["colour"] == doc["answer"]
        else:
            named = [o for o in objects if f"the {o['colour']} object" in doc["question"]]
            assert len(named) == 1 and named[0]["shape"] == doc["answer"]


def test_rendered_objects_sit_where_the_scene_says():
    objects = shapes.random_scene(7)
    image = shapes.render_scene(objects, size=(336, 336))
    for o in objects:
        centre = image.getpixel(
            (
                round(o["x"] * 336),
                round(o["y"] * 336 + (o["r"] * 336 * 0.4 if o["shape"] == "triangle" else 0)),
            )
        )
        assert centre == shapes.COLOURS[o["colour"]], o
    assert image.getpixel((0, 0)) == shapes.BACKGROUND
    assert shapes.render_scene(objects).tobytes() == image.tobytes()  # deterministic


@pytest.mark.parametrize(
    "prediction, answer, score",
    [
        ("Red.", "red", 1.0),
        ("  the Circle ", "circle", 1.0),
        ("grey", "gray", 1.0),
        ("red circle", "red", 0.0),
        ("", "red", 0.0),
    ],
)
def test_exact_match_normalizes(prediction, answer, score):
    assert shapes.process_results({"answer": answer}, [prediction]) == {"exact_match": score}


def test_task_yaml_files_use_local_data_and_process_results():
    for name in ("prune_shapes", "prune_easyvqa"):
        text = (TASKS_DIR / f"{name}.yaml").read_text().replace("!function", "")
        config = yaml.safe_load(text)
        assert config["task"] == name and config["tag"] == "prune_offline"
        assert config["dataset_path"] == "json"
        assert (TASKS_DIR / config["dataset_kwargs"]["data_files"]["test"]).is_file()
        assert (
            config["metric_list"][0]["metric"] == "exact_match"
        )  # computed in process_results, no hub metric
        assert "process_results" in config


def test_easyvqa_docs_join_the_package_data():
    pytest.importorskip("easy_vqa")
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in easyvqa.DATA_FILE.read_text().splitlines()]
    assert [r["qid"] for r in rows] == list(range(0, easyvqa.STRIDE * len(rows), easyvqa.STRIDE))
    docs = easyvqa.process_docs(datasets.Dataset.from_list(rows[:5]))
    import easy_vqa

    answers = set(easy_vqa.get_answers())
    for doc in docs:
        assert doc["answer"] in answers and doc["question"].endswith("?")
        (image,) = easyvqa.doc_to_visual(doc)
        assert image.size == (64, 64) and image.mode == "RGB"
