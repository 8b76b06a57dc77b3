"""`student check` on a pair that can train and on one that cannot, through the CLI."""

import shutil

from click.testing import CliRunner

from student.cli import main
from tests.test_family_matrix import MATRIX, matrix_cache, matrix_model  # noqa: F401 - fixtures


def _run(student, cache, *extra):
    return CliRunner().invoke(main, ["check", "--student", str(student), "--cache", str(cache), "--batch-size", "2", *extra])


def test_a_pair_that_can_train(matrix_model, matrix_cache):
    gemma, qwen = MATRIX.index(("gemma3-tiny", "tiny-bpe")), MATRIX.index(("qwen2-vl-tiny", "tiny-bpe"))
    result = _run(matrix_model(gemma), matrix_cache(qwen))
    assert result.exit_code == 0, result.output
    out = result.output
    assert "gemma3: 2 x Gemma3DecoderLayer (full_attention, sliding_attention)" in out
    assert "stage 1 Recalibrator: copies of the student's last 2 attention layers" in out
    assert "teacher: qwen2_vl" in out and "student hidden 96" in out
    assert out.count("estimated memory") == 3 and "the pair can train" in out and "problem:" not in out
    assert "stage 1: trains" in out and "freezes" in out


def test_a_pair_that_cannot_train(tmp_path, matrix_model, matrix_cache):
    """A student whose tokenizer outgrew its head (tokens added, embeddings not resized)."""
    from transformers import AutoTokenizer

    folder = tmp_path / "student"
    shutil.copytree(matrix_model(MATRIX.index(("llava-tiny", "mistral"))), folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.add_tokens([f"<extra{i}>" for i in range(200)])
    tok.save_pretrained(folder)
    result = _run(folder, matrix_cache(0), "--stage", "3")
    assert result.exit_code == 2, result.output
    size = len(AutoTokenizer.from_pretrained(folder))
    assert f"problem: the student's tokenizer has {size} tokens but its head only 32064 rows" in result.output
