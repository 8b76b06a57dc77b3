"""Vision pretraining (pipeline/vlm/vision_pretrain.py): labels, which parameters move, the CLI."""

from __future__ import annotations

import re

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from pipeline.cli import main as pipeline_main
from pipeline.vlm.data import DataError, read_samples
from pipeline.vlm.vision_pretrain import image_labels, pretrain_vision


def test_labels_are_the_answers_of_open_questions_per_image():
    labels = image_labels("easy-vqa:train", skip=10, limit=200)
    expected: dict[str, dict[str, str]] = {}  # plain reference: image ref -> type -> answer
    for i, s in enumerate(read_samples("easy-vqa:train")):
        if i >= 210:
            break
        if i >= 10 and s.meta["question_type"] != "yes/no":
            expected.setdefault(s.images[0].ref, {})[s.meta["question_type"]] = s.answer
    got = {spec.ref: {k: labels.classes[k][v] for k, v in t.items()} for spec, t in zip(labels.images, labels.targets)}
    assert got == expected
    assert set(labels.classes) == {"color", "shape"}


def test_no_labels_is_a_clear_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"id": "a", "messages": [{"role": "user", "content": "hi"}, '
                    '{"role": "assistant", "content": "yo"}]}\n')
    with pytest.raises(DataError, match="question_type"):
        image_labels(str(path))


@pytest.mark.parametrize("family,tokenizer", [("llava-tiny", "mistral"), ("qwen2-vl-tiny", "tiny-bpe")])
def test_only_the_vision_path_moves_and_the_loss_falls(tiny_vlm_dir, tmp_path, family, tokenizer):
    init = tiny_vlm_dir(family, tokenizer)
    lines: list[str] = []
    out = pretrain_vision(init, tmp_path / "vpre", "easy-vqa:train", limit=300, steps=40, lr=3e-3, batch_size=16,
                          log=lines.append)
    before, after = load_file(init / "model.safetensors"), load_file(out / "model.safetensors")
    assert before.keys() == after.keys()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved, "vision pretraining changed no weight"
    text = {k for k in before if "language_model" in k or "lm_head" in k}
    assert text and not (moved & text), f"text-side weights moved: {sorted(moved & text)[:5]}"
    losses = [float(m.group(1)) for m in map(re.compile(r"loss ([0-9.]+)").search, lines) if m]
    assert len(losses) == 2 and losses[-1] < losses[0], lines


def test_cli_writes_a_loadable_folder(tiny_vlm_dir, tmp_path):
    from pipeline.vlm.models import load_vlm

    init = tiny_vlm_dir("llava-tiny", "mistral")
    result = CliRunner().invoke(pipeline_main, ["pretrain-vision", "--model", str(init), "--data", "easy-vqa:train",
                                                "--limit", "64", "--steps", "2", "--out", str(tmp_path / "v")])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    load_vlm(str(tmp_path / "v"), device="cpu")


def test_scene_labels_are_every_cells_content_from_the_ground_truth():
    from pipeline.vlm.scenes import GRID, scene_record

    labels = image_labels("scenes:train", skip=0, limit=12)
    assert len(labels.images) == 12 and set(labels.classes) == {f"cell{k}" for k in range(GRID * GRID)}
    for i, target in enumerate(labels.targets):  # plain reference: the record's objects, cell by cell
        record = scene_record("train", i)
        expected = {f"cell{k}": "empty" for k in range(GRID * GRID)}
        for obj in record["objects"]:
            expected[f"cell{obj['row'] * GRID + obj['col']}"] = f"{obj['size']} {obj['color']} {obj['shape']}"
        assert {k: labels.classes[k][v] for k, v in target.items()} == expected


def test_cell_probe_attends_to_its_cell_and_equals_the_mean_at_first():
    from pipeline.vlm.vision_pretrain import ProbeHead

    torch.manual_seed(0)
    tokens = [torch.randn(5, 8), torch.randn(3, 8)]
    head = ProbeHead(8, 4, attend=True)
    mean = torch.stack([t.mean(0) for t in tokens])
    torch.testing.assert_close(head(tokens), head.linear(mean))  # a zero query: uniform attention
    with torch.no_grad():
        head.query.copy_(50 * tokens[0][2] / tokens[0][2].norm())  # a query that picks token 2 of the first image
    torch.testing.assert_close(head(tokens)[0], head.linear(tokens[0][2]), rtol=1e-3, atol=1e-3)


def test_scene_pretraining_lowers_the_cell_loss(tiny_vlm_dir, tmp_path):
    lines: list[str] = []
    pretrain_vision(tiny_vlm_dir("qwen2-vl-tiny", "tiny-bpe"), tmp_path / "vpre", "scenes:train", limit=64, steps=30,
                    lr=3e-3, batch_size=16, held_out=(1000, 32), log=lines.append)
    losses = [float(m.group(1)) for m in map(re.compile(r"loss ([0-9.]+)").search, lines) if m]
    assert losses[-1] < losses[0], lines
    assert any("cells" in line for line in lines if "probe" in line)
