"""The built-in scenes source: deterministic records from seeds, disjoint splits, drawn images that show what
the ground truth says, and a scorer that judges any wording or order."""

import itertools

import numpy as np

from pipeline.vlm.data import read_samples
from pipeline.vlm.evaluate import evaluate
from pipeline.vlm.scenes import (COLORS, GRID, IMAGE_SIZE, QUESTION_TYPES, description_f1, draw_scene, scene_record,
                                 score_answer)

SCENE = [{"size": "small", "color": "red", "shape": "circle", "row": 0, "col": 0},
         {"size": "large", "color": "blue", "shape": "square", "row": 1, "col": 1},
         {"size": "small", "color": "yellow", "shape": "triangle", "row": 2, "col": 2}]
DESCRIBE = {"question_type": "describe", "scene": SCENE, "truth": {}}


def test_a_right_description_in_another_order_scores_1_and_a_wrong_colour_lowers_it():
    right = "small red circle at top left, large blue square at center, small yellow triangle at bottom right"
    reordered = "Small yellow triangle at bottom right; a large blue square at center and a small red circle at top left."
    assert score_answer(right, DESCRIBE) == 1.0
    assert score_answer(reordered, DESCRIBE) == 1.0
    wrong_colour = "small green circle at top left, large blue square at center, small yellow triangle at bottom right"
    assert score_answer(wrong_colour, DESCRIBE) == 2 * 2 / 6  # two of three objects right, three named
    missing = "large blue square at center"
    assert score_answer(missing, DESCRIBE) == 2 * 1 / 4
    doubled = right + ", large blue square at center"  # naming an object twice counts once
    assert score_answer(doubled, DESCRIBE) == 2 * 3 / 7
    assert score_answer("", DESCRIBE) == 0.0 and score_answer("I see shapes.", DESCRIBE) == 0.0


def test_short_answers_are_judged_by_their_parsed_value():
    count = {"question_type": "count", "truth": {"count": 2}}
    assert score_answer("two red objects", count) == 1.0 and score_answer("2", count) == 1.0
    assert score_answer("three red objects", count) == 0.0 and score_answer("red", count) == 0.0
    zero = {"question_type": "count", "truth": {"count": 0}}
    assert score_answer("no circles", zero) == 1.0 and score_answer("none", zero) == 1.0
    colour = {"question_type": "attribute", "truth": {"attribute": "color", "value": "blue"}}
    assert score_answer("Blue.", colour) == 1.0 and score_answer("it is blue", colour) == 1.0
    assert score_answer("blue or red", colour) == 0.0 and score_answer("green", colour) == 0.0
    shape = {"question_type": "attribute", "truth": {"attribute": "shape", "value": "square"}}
    assert score_answer("squares", shape) == 1.0
    relation = {"question_type": "relation", "truth": {"relation": "above left"}}
    assert score_answer("above left", relation) == 1.0 and score_answer("it is above and to the left", relation) == 1.0
    assert score_answer("above", relation) == 0.0 and score_answer("below left", relation) == 0.0


def test_every_reference_answer_scores_1_against_its_own_truth():
    for split in ("train", "test"):
        for i in range(200):
            record = scene_record(split, i)
            meta = {"question_type": record["question_type"], "scene": record["objects"], "truth": record["truth"]}
            assert score_answer(record["answer"], meta) == 1.0, record


def test_records_are_deterministic_and_the_splits_never_share_a_scene():
    first = [scene_record("train", i) for i in range(50)]
    assert first == [scene_record("train", i) for i in range(50)]
    train = {str(scene_record("train", i)["objects"]) for i in range(2000)}
    test = {str(scene_record("test", i)["objects"]) for i in range(300)}
    assert not train & test
    kinds = [scene_record("train", i)["question_type"] for i in range(8)]
    assert kinds == list(QUESTION_TYPES) * 2
    assert all(" " in scene_record("train", i)["answer"] for i in range(0, 40, 4))  # descriptions: many tokens


def test_the_drawn_image_shows_each_object_in_its_cell():
    image = np.asarray(draw_scene(SCENE))
    cell = IMAGE_SIZE // GRID
    for obj in SCENE:
        cy, cx = int((obj["row"] + 0.5) * cell), int((obj["col"] + 0.5) * cell)
        assert tuple(image[cy, cx]) == COLORS[obj["color"]]
    assert tuple(image[cell + 2, 2]) == (255, 255, 255)  # an empty cell stays white
    assert description_f1("large blue square at center", SCENE) == 0.5


def test_read_samples_and_eval_score_per_type(tmp_path):
    samples = list(itertools.islice(read_samples("scenes:test"), 8))
    assert [s.sample_id for s in samples[:2]] == ["scenes:test:0", "scenes:test:1"]
    assert samples[0].images[0].ref.startswith("sha256:") and samples[0].images[0].load().size == (64, 64)

    class Oracle:  # answers every question with the reference, except counts, answered wrong
        def prompt(self, sample):
            return sample.answer

        def __call__(self, batch):
            return [p.sample.answer if p.sample.meta["question_type"] != "count" else "nine" for p in batch]

    result = evaluate("oracle", "scenes:test", limit=8, predictor=Oracle(), out=str(tmp_path / "r.json"), progress=False)
    assert {k: v["score"] for k, v in result["per_type"].items()} == {"attribute": 1.0, "count": 0.0, "describe": 1.0,
                                                                      "relation": 1.0}
    assert result["score"] == 0.75 and result["accuracy"] == 6 / 8
