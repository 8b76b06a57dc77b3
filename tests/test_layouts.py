"""The Recalibrator's layouts and the question-reliance diagnostic (student/layouts.py, student/diagnostics.py)."""

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from pipeline.store.teacher_head import TeacherHead
from pipeline.vlm.models import load_vlm
from student.diagnostics import question_reliance
from student.recalibrator import Recalibrator, language_model
from student.layouts import layout_named

D_TEACHER, VOCAB = 48, 97


@pytest.fixture(scope="module")
def student(tiny_vlm_dir):
    return load_vlm(tiny_vlm_dir("llava-tiny", "tiny-bpe")).model


def _items(d_student: int, prompt_lens=(6, 9, 5, 7), answer_lens=(3, 1, 4, 2), seed=0):
    """Student hidden states [B, L, d_s] and items with the cached teacher side (features, targets)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(len(prompt_lens), max(p + a for p, a in zip(prompt_lens, answer_lens)), d_student, generator=g)
    items = [SimpleNamespace(student=SimpleNamespace(prompt_len=p), teacher_features=torch.randn(a, D_TEACHER, generator=g),
                             teacher_targets=torch.randint(VOCAB, (a,), generator=g))
             for p, a in zip(prompt_lens, answer_lens)]
    return hidden, items


def main_segments(hidden, items, layout, rec=None):
    return layout_named(layout).segments(hidden, items, rec)


def _scored(rec, hidden, items, layout):
    segments = main_segments(hidden, items, layout, rec)
    return rec(segments, [len(item.teacher_features) for item in items])


def _no_attention(rec: Recalibrator) -> Recalibrator:
    """Blocks whose attention adds nothing: every position's output depends on its own input only."""
    for layer in rec.layers:
        layer.self_attn.o_proj.weight.data.zero_()
    return rec


@torch.no_grad()
def test_new_layout_predicts_the_first_token_from_the_student_alone(student):
    rec = Recalibrator.from_student(student, D_TEACHER).eval()
    hidden, items = _items(language_model(student).config.hidden_size)
    base = _scored(rec, hidden, items, "student-last-prompt")
    assert [len(o) for o in base] == [len(i.teacher_features) for i in items]
    moved_teacher = [SimpleNamespace(**{**vars(i), "teacher_features": i.teacher_features.clone()}) for i in items]
    for item in moved_teacher:
        item.teacher_features[0] += 3.0  # the teacher's last prompt feature
    after = _scored(rec, hidden, moved_teacher, "student-last-prompt")
    for a, b in zip(base, after):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    moved_question = hidden.clone()
    moved_question[:, :4] += 1.0  # the student's question
    after = _scored(rec, moved_question, items, "student-last-prompt")
    assert all(not torch.allclose(a[0], b[0]) for a, b in zip(base, after))


@torch.no_grad()
def test_old_layout_reads_the_first_token_off_the_teacher(student):
    rec = Recalibrator.from_student(student, D_TEACHER).eval()
    hidden, items = _items(language_model(student).config.hidden_size)
    base = _scored(rec, hidden, items, "teacher-last-prompt")
    moved = [SimpleNamespace(**{**vars(i), "teacher_features": i.teacher_features.clone()}) for i in items]
    for item in moved:
        item.teacher_features[0] += 3.0
    after = _scored(rec, hidden, moved, "teacher-last-prompt")
    assert all(not torch.allclose(a[0], b[0]) for a, b in zip(base, after))
    # with attention switched off, the old layout's outputs do not see the student at all
    blind = _no_attention(Recalibrator.from_student(student, D_TEACHER).eval())
    moved_question = hidden + 1.0
    for a, b in zip(_scored(blind, hidden, items, "teacher-last-prompt"), _scored(blind, moved_question, items, "teacher-last-prompt")):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _sharp_head(seed=1) -> TeacherHead:
    g = torch.Generator().manual_seed(seed)
    return TeacherHead(30 * torch.randn(VOCAB, D_TEACHER, generator=g))


@torch.no_grad()
def test_reliance_is_zero_for_a_recalibrator_that_ignores_the_student(student):
    rec = _no_attention(Recalibrator.from_student(student, D_TEACHER).eval())
    hidden, items = _items(language_model(student).config.hidden_size)
    terms = question_reliance(rec, _sharp_head(), main_segments(hidden, items, "teacher-last-prompt"), items)
    assert abs(terms["question_reliance"].item()) < 1e-5
    assert abs(terms["question_reliance_first"].item()) < 1e-5


@torch.no_grad()
def test_reliance_is_positive_when_the_answer_needs_the_question_and_matches_a_plain_computation(student):
    rec = _no_attention(Recalibrator.from_student(student, D_TEACHER).eval())
    head = _sharp_head()
    hidden, items = _items(language_model(student).config.hidden_size)
    segments = main_segments(hidden, items, "student-last-prompt")
    lengths = [len(i.teacher_features) for i in items]
    for item, out in zip(items, rec(segments, lengths)):  # targets that the true question predicts
        item.teacher_targets = head.logits(out).argmax(-1)
    terms = question_reliance(rec, head, segments, items)
    assert terms["question_reliance_first"].item() > 1.0
    assert terms["question_reliance"].item() > 0.1
    # plain reference: rotate the student segments by hand, full softmax per sample
    rotated = [[segments[(b + 1) % len(segments)][0], segments[b][1]] for b in range(len(segments))]
    true_ce, shuffled_ce = [], []
    for which, out in ((true_ce, rec(segments, lengths)), (shuffled_ce, rec(rotated, lengths))):
        for item, o in zip(items, out):
            which.append(-torch.log_softmax(o @ head.weight.T, -1).gather(1, item.teacher_targets[:, None])[:, 0])
    expected = torch.cat(shuffled_ce).mean() - torch.cat(true_ce).mean()
    expected_first = torch.stack([s[0] for s in shuffled_ce]).mean() - torch.stack([t[0] for t in true_ce]).mean()
    torch.testing.assert_close(terms["question_reliance"], expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(terms["question_reliance_first"], expected_first, rtol=1e-4, atol=1e-4)


def test_a_batch_of_one_has_no_reliance(student):
    rec = Recalibrator.from_student(student, D_TEACHER).eval()
    hidden, items = _items(language_model(student).config.hidden_size, prompt_lens=(6,), answer_lens=(3,))
    terms = question_reliance(rec, _sharp_head(), main_segments(hidden, items, "student-last-prompt"), items)
    assert terms["question_reliance"].item() == 0.0


def test_unknown_layout_is_a_clear_error(student):
    hidden, items = _items(language_model(student).config.hidden_size)
    with pytest.raises(ValueError, match="unknown Recalibrator layout 'sideways': one of student-last-prompt"):
        main_segments(hidden, items, "sideways")


def _with_tokens(rec: Recalibrator, seed=2) -> Recalibrator:
    rec.attach_token_embeddings(torch.randn(VOCAB, D_TEACHER, generator=torch.Generator().manual_seed(seed)))
    return rec


def _moved_teacher(items, rows=slice(None)):
    moved = [SimpleNamespace(**{**vars(i), "teacher_features": i.teacher_features.clone()}) for i in items]
    for item in moved:
        item.teacher_features[rows] += 3.0
    return moved


@torch.no_grad()
def test_token_layout_needs_the_student_at_every_slot_and_never_reads_the_teachers_states(student):
    rec = _with_tokens(Recalibrator.from_student(student, D_TEACHER).eval())
    hidden, items = _items(language_model(student).config.hidden_size, answer_lens=(3, 2, 4, 2))
    base = _scored(rec, hidden, items, "teacher-tokens")
    assert [len(o) for o in base] == [len(i.teacher_features) for i in items]
    for a, b in zip(base, _scored(rec, hidden, _moved_teacher(items), "teacher-tokens")):  # every hidden state moved
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    moved_question = hidden.clone()
    moved_question[:, :4] += 1.0  # the student's question
    for a, b in zip(base, _scored(rec, moved_question, items, "teacher-tokens")):
        assert all(not torch.allclose(a[t], b[t]) for t in range(1, len(a)))  # every later slot
    # slot t's input is the embedding of the token said at t - 1
    segments = main_segments(hidden, items, "teacher-tokens", rec)
    torch.testing.assert_close(segments[0][1][0], rec.token_table[items[0].teacher_targets[:-1]])


@torch.no_grad()
def test_default_layout_later_slots_read_the_teachers_state_at_that_position(student):
    """What the token layout removes: with the default layout, slot t > 0 is fed the teacher's state at t - 1,
    whose head output is the token at t; a Recalibrator can answer every later slot without the student."""
    rec = Recalibrator.from_student(student, D_TEACHER).eval()
    hidden, items = _items(language_model(student).config.hidden_size, answer_lens=(3, 2, 4, 2))
    base = _scored(rec, hidden, items, "student-last-prompt")
    after = _scored(rec, hidden, _moved_teacher(items, slice(1, None)), "student-last-prompt")
    for a, b in zip(base, after):
        torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)  # the first slot is the student's
        assert all(not torch.allclose(a[t], b[t]) for t in range(1, len(a)))
    blind = _no_attention(Recalibrator.from_student(student, D_TEACHER).eval())  # reads each position alone
    moved_question = hidden.clone()
    moved_question[:, :4] += 1.0
    for a, b in zip(_scored(blind, hidden, items, "student-last-prompt"),
                    _scored(blind, moved_question, items, "student-last-prompt")):
        torch.testing.assert_close(a[1:], b[1:], rtol=0, atol=0)  # later slots: no student at all


@torch.no_grad()
def test_reliance_of_later_slots_matches_a_plain_computation(student):
    rec = _with_tokens(Recalibrator.from_student(student, D_TEACHER).eval())
    head = _sharp_head()
    hidden, items = _items(language_model(student).config.hidden_size, answer_lens=(3, 1, 4, 2))
    segments = main_segments(hidden, items, "teacher-tokens", rec)
    lengths = [len(i.teacher_features) for i in items]
    terms = question_reliance(rec, head, segments, items)
    rotated = [[segments[(b + 1) % len(segments)][0], segments[b][1]] for b in range(len(segments))]
    gaps = []
    for item, o_true, o_rot in zip(items, rec(segments, lengths), rec(rotated, lengths)):
        ce = lambda o: -torch.log_softmax(o @ head.weight.T, -1).gather(1, item.teacher_targets[:, None])[:, 0]  # noqa: E731
        gaps += list(ce(o_rot)[1:] - ce(o_true)[1:])
    torch.testing.assert_close(terms["question_reliance_later"], torch.stack(gaps).mean(), rtol=1e-4, atol=1e-4)
    assert terms["question_reliance_later"].item() != 0.0


def test_token_layout_trains_stages_1_and_2_from_a_cache_and_an_old_cache_is_refused_before_the_student_loads(
        tmp_path, pair_cache, pair_student, monkeypatch):
    import shutil

    import student.train
    from pipeline.store.teacher_embeddings import load_teacher_embeddings
    from pipeline.store.reader import CacheReader
    from schemas import EMBED_FILE
    from student.config import LossConfig, TrainConfig
    from student.train import train_stage

    def cfg(cache, stage):
        return TrainConfig(cache=str(cache), student=str(pair_student.path), out=str(tmp_path / "run"), stage=stage,
                           steps=2, batch_size=4, num_workers=0, attention_every=1,
                           loss=LossConfig(layout="teacher-tokens"))

    for stage in (1, 2):
        metrics = train_stage(cfg(pair_cache, stage), progress=False)
        assert all(torch.isfinite(torch.tensor(m["total"])) for m in metrics)
        assert all("question_reliance_later" in m for m in metrics)
    saved = json.loads((tmp_path / "run" / "stage2" / "train_config.json").read_text())
    assert saved["loss"]["layout"] == "teacher-tokens"
    table = load_teacher_embeddings(pair_cache, CacheReader(pair_cache).manifest)
    weights = load_file(str(tmp_path / "run" / "stage2" / "recalibrator" / "model.safetensors"))
    assert "proj_tokens.weight" in weights and "token_table" not in weights  # the table stays in the cache
    assert table.shape[1] == weights["proj_tokens.weight"].shape[1]
    old = tmp_path / "old-cache"
    shutil.copytree(pair_cache, old)
    (old / EMBED_FILE).unlink()
    monkeypatch.setattr(student.train, "load_vlm", lambda *a, **k: pytest.fail("the student was loaded"))
    with pytest.raises(Exception, match="cannot serve --layout teacher-tokens"):
        train_stage(cfg(old, 1), progress=False)
