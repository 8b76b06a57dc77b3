"""`student eval`: batched greedy predictions equal one-at-a-time generate; scoring, JSON output and CLI.

The generator itself (batching, end-of-turn cut) is tested in tests/test_generation.py."""

import itertools
import json

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.vlm.data import DataError, read_samples
from pipeline.vlm.models import ModelLoadError, end_of_turn_ids, load_vlm
from pipeline.vlm.prompting import render
from student.cli import main
from pipeline.vlm.answers import is_match, normalize_answer
from pipeline.vlm.evaluate import data_slug, evaluate, question_text

FAMILIES = [("qwen2-vl-tiny", "qwen2"), ("llava-tiny", "mistral")]


def reference_predictions(folder, samples, max_new_tokens):
    """Plain batch-1 greedy `generate`, no padding at all: (texts, prompt lengths)."""
    vlm = load_vlm(folder, dtype="float32", device="cpu")
    eot = end_of_turn_ids(vlm.tokenizer, vlm.processor.chat_template)
    pad = vlm.tokenizer.pad_token_id if vlm.tokenizer.pad_token_id is not None else eot[0]
    texts, lengths = [], []
    for s in samples:
        inputs = vlm.processor(text=[render(vlm.processor, s.messages, add_generation_prompt=True)],
                               images=[spec.load() for spec in s.images], return_tensors="pt")
        with torch.inference_mode():
            out = vlm.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                     eos_token_id=eot, pad_token_id=pad)
        lengths.append(inputs["input_ids"].shape[1])
        texts.append(vlm.tokenizer.decode(out[0, lengths[-1]:], skip_special_tokens=True).strip())
    return texts, lengths


@pytest.mark.parametrize("name,tokenizer", FAMILIES)
def test_batched_predictions_equal_one_at_a_time(tmp_path, tiny_vlm_dir, name, tokenizer):
    folder = tiny_vlm_dir(name, tokenizer)
    samples = list(itertools.islice(read_samples("easy-vqa:test"), 6))
    expected, lengths = reference_predictions(folder, samples, max_new_tokens=8)
    assert len(set(lengths[:4])) > 1 and len(set(lengths[4:])) > 1  # both batches are left-padded
    out = tmp_path / "result.json"
    result = evaluate(str(folder), "easy-vqa:test", limit=6, batch_size=4, max_new_tokens=8, out=str(out),
                      device="cpu", progress=False)
    assert [e["id"] for e in result["examples"]] == [s.sample_id for s in samples]
    assert [e["prediction"] for e in result["examples"]] == expected
    assert any(expected)  # random weights write something: the comparison is not vacuous
    assert result["samples"] == 6 and result["skipped"] == 0
    assert json.loads(out.read_text())["examples"] == result["examples"]


@pytest.mark.parametrize("prediction,answer", [("The Circle.", "circle"), (" Yes ", "yes"), ("a  red", "Red"),
                                               ("an apple!", "apple"), ("BLUE\n", "blue"), ("no.", "No")])
def test_normalized_matches(prediction, answer):
    assert is_match(prediction, answer)


@pytest.mark.parametrize("prediction,answer", [("red", "reddish"), ("yes", "no"), ("circle", "the"),
                                               ("red circle", "circle"), ("", "yes")])
def test_normalized_mismatches(prediction, answer):
    assert not is_match(prediction, answer)


def test_normalize_and_slug():
    assert normalize_answer("  The   Big  Circle?! ") == "big circle"
    assert data_slug("easy-vqa:test") == "easy-vqa-test"
    assert data_slug("easy-vqa:test", 50) == "easy-vqa-test-limit50"
    assert data_slug("/data/sets/my vqa.jsonl") == "my-vqa.jsonl"


class ShapesOnly:
    """Stand-in predictor: right (in a sloppy form) on shape questions, wrong elsewhere."""

    def __init__(self):
        self.batch_sizes = []

    def prompt(self, sample):
        return question_text(sample)

    def __call__(self, batch):
        self.batch_sizes.append(len(batch))
        return [f"The {p.sample.answer.title()}." if p.sample.meta["question_type"] == "shape" else "purple"
                for p in batch]


def test_accuracy_overall_and_per_type(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    samples = list(itertools.islice(read_samples("easy-vqa:test"), 30))
    counts = {t: sum(s.meta["question_type"] == t for s in samples) for t in ("shape", "color", "yes/no")}
    assert all(counts.values())  # the first 30 questions mix all three types
    predictor = ShapesOnly()
    result = evaluate(str(model), "easy-vqa:test", limit=30, batch_size=8, progress=False, predictor=predictor)
    assert predictor.batch_sizes == [8, 8, 8, 6]
    path = model / "eval" / "easy-vqa-test-limit30.json"
    assert json.loads(path.read_text()) == result and result["output"] == str(path)
    assert result["samples"] == 30 and result["correct"] == counts["shape"]
    assert result["accuracy"] == pytest.approx(counts["shape"] / 30)
    assert result["per_type"]["shape"] == {"samples": counts["shape"], "correct": counts["shape"], "accuracy": 1.0,
                                           "score": 1.0}
    assert result["per_type"]["color"] == {"samples": counts["color"], "correct": 0, "accuracy": 0.0, "score": 0.0}
    assert result["score"] == pytest.approx(1 / 3)  # the mean over the three types
    assert result["per_type"]["yes/no"]["accuracy"] == 0.0
    first = result["examples"][0]
    assert first["id"] == samples[0].sample_id and first["question"] == question_text(samples[0])
    assert len(result["examples"]) == 20 and result["skipped"] == 0
    assert not list(path.parent.glob(".tmp-*"))  # atomic write left no temporary file


def test_bad_records_and_broken_images_are_skipped(tmp_path):
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    records = [
        {"id": "good", "image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                            {"from": "gpt", "value": "red"}]},
        {"id": "missing", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                                 {"from": "gpt", "value": "red"}]},
        {"id": "broken", "image": "broken.png", "conversations": [{"from": "human", "value": "<image>\nColor?"},
                                                                  {"from": "gpt", "value": "red"}]},
        {"id": "bad", "conversations": "not a list"},
        {"id": "text", "conversations": [{"from": "human", "value": "Say red."}, {"from": "gpt", "value": "Red"}]},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))

    class SayRed:
        def prompt(self, sample):
            return question_text(sample)

        def __call__(self, batch):
            return ["red"] * len(batch)

    result = evaluate(str(tmp_path), str(data), image_root=str(tmp_path), progress=False, predictor=SayRed())
    assert (result["samples"], result["correct"], result["accuracy"], result["skipped"]) == (2, 2, 1.0, 3)
    assert result["per_type"] == {}
    assert sorted(s["id"] for s in result["skipped_examples"]) == ["bad", "broken", "missing"]
    assert (tmp_path / "eval" / "data.jsonl.json").exists()


def test_missing_model_and_data_raise_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="not an existing local folder"):
        evaluate(str(tmp_path / "no-such-model"), "easy-vqa:test", limit=1, progress=False)
    with pytest.raises(DataError, match="does not exist"):
        evaluate(str(tmp_path), str(tmp_path / "none.jsonl"), progress=False)


def test_cli_eval(tiny_vlm_dir, tmp_path):
    folder = tiny_vlm_dir("llava-tiny", "mistral")
    runner = CliRunner()
    result = runner.invoke(main, ["eval", "--model", str(folder), "--data", "easy-vqa:test", "--limit", "4",
                                  "--batch-size", "3", "--max-new-tokens", "4", "--device", "cpu", "--no-progress"])
    assert result.exit_code == 0, result.output
    path = folder / "eval" / "easy-vqa-test-limit4.json"
    saved = json.loads(path.read_text())
    assert saved["samples"] == 4 and saved["model"] == str(folder)
    assert str(path) in result.output and "all: " in result.output
    missing = runner.invoke(main, ["eval", "--model", str(tmp_path / "gone"), "--data", "easy-vqa:test"])
    assert missing.exit_code == 2
    assert "error:" in missing.stderr and "gone" in missing.stderr
