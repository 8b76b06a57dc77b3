"""`student check` on pairs that can train and ones that cannot, per method, through the CLI."""

import shutil

from click.testing import CliRunner

from student.cli import main
from tests.test_family_matrix import MATRIX, matrix_cache, matrix_model  # noqa: F401 - fixtures
from tests.vlsi_fixtures import same_cache, same_cache_without_layers, same_student, same_teacher_dir  # noqa: F401


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


def test_the_same_tokenizer_pair_checks_for_kd_and_vlsi(same_cache, same_student):
    kd = _run(same_student.path, same_cache, "--method", "kd")
    assert kd.exit_code == 0, kd.output
    assert "tokenizer: the student's is the teacher's" in kd.output
    assert kd.output.count("estimated memory") == 2 and "stage 2: trains" in kd.output and "stage 1" not in kd.output
    vlsi = _run(same_student.path, same_cache, "--method", "vlsi")
    assert vlsi.exit_code == 0, vlsi.output
    out = vlsi.output
    assert "cache layers: 1, 2, 3 of the teacher's 4" in out
    assert "stage 1 verbalizers: teacher layers 1, 2, 3, student layers 1, 2" in out
    assert out.count("estimated memory") == 3 and "+ verbalizers" in out and "the pair can train" in out
    # stage 1 trains both sides' verbalizers (3 d^2 + d per layer: 3 teacher layers at d=128, 2 student at d=64)
    verbalizer_params = 3 * (3 * 128 * 128 + 128) + 2 * (3 * 64 * 64 + 64)
    assert f"stage 1: trains {verbalizer_params:,} parameters (0 student tensors + verbalizers)" in out


def test_vlsi_and_kd_refuse_a_cross_tokenizer_pair_and_vlsi_a_cache_without_layers(matrix_model, same_cache,
                                                                                   same_cache_without_layers,
                                                                                   same_student):
    other = matrix_model(MATRIX.index(("llava-tiny", "mistral")))
    for method in ("kd", "vlsi"):
        result = _run(other, same_cache, "--method", method)
        assert result.exit_code == 2, result.output
        assert f"problem: --method {method} compares the two models' distributions token by token" in result.output
        assert "Use --method genrecal" in result.output and "estimated memory" not in result.output
    no_layers = _run(same_student.path, same_cache_without_layers, "--method", "vlsi")
    assert no_layers.exit_code == 2 and "--layers" in no_layers.output, no_layers.output
    assert _run(same_student.path, same_cache_without_layers, "--method", "vlsi", "--stage", "3").exit_code == 0
    wrong_stage = _run(same_student.path, same_cache, "--method", "kd", "--stage", "1")
    assert wrong_stage.exit_code == 2 and "--method kd has no stage 1" in wrong_stage.output
