"""GenRecal losses on a real cache from a tiny teacher, for a student of another family and tokenizer."""

import pytest
import torch

from pipeline.store.teacher_head import TeacherHead
from pipeline.vlm.models import end_of_turn_ids, load_vlm
from pipeline.store.teacher_head import load_teacher_head
from student.batches import CacheStudentData, LengthGroupedSampler
from student.recalibrator import Recalibrator
from student.config import LossConfig
from student.step import genrecal_losses


@pytest.fixture
def cache(pair_cache):
    return pair_cache


@pytest.fixture
def student(pair_student):
    return pair_student


def make_batch(cache, student):
    tok = student.tokenizer
    eot = end_of_turn_ids(tok, student.processor.chat_template)
    data = CacheStudentData(cache, student.processor, eot, tok.pad_token_id)
    batch = data.collate([data[i] for i in range(len(data))])
    return data, batch


def teacher_head(cache, data):
    weight, bias = load_teacher_head(cache, data.reader.manifest)
    return TeacherHead(weight.float(), bias)


def test_items_pair_the_students_tokens_with_the_teachers(cache, student):
    data, batch = make_batch(cache, student)
    item = data[0]
    assert item.student.answer_ids[-1] == student.tokenizer.eos_token_id  # Mistral-style </s>
    assert item.teacher_targets[-1].item() == 151645  # the teacher's <|im_end|>
    assert item.teacher_features.shape == (len(item.teacher_targets), 128)
    assert batch.inputs["input_ids"].shape[0] == len(data)
    assert any(i.teacher_question is not None for i in batch.items)
    sampler = LengthGroupedSampler(data.lengths, batch_size=3, seed=1)
    assert sorted(i for b in sampler for i in b) == list(range(len(data)))


@pytest.mark.parametrize("stage, distribution", [(1, "exact"), (2, "topk")])
def test_overfitting_one_batch_drives_every_term_down(cache, student, stage, distribution):
    torch.manual_seed(0)
    data, batch = make_batch(cache, student)
    head = teacher_head(cache, data)
    model = load_vlm(student.path).model  # a fresh copy: this test trains it
    rec = Recalibrator.from_student(model, 128)
    body_and_head = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    params = list(rec.parameters()) + (body_and_head if stage == 2 else [])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    cfg = LossConfig(teacher_distribution=distribution)
    history = []
    for _ in range(40):
        terms = genrecal_losses(model, rec, head, batch, stage, cfg)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in terms.items()})
    expected = {"ce", "kl", "reg_ce", "reg_kl", "total"} | ({"student_ce"} if stage == 2 else set())
    assert set(history[0]) == expected
    for name in expected:
        assert history[-1][name] < 0.5 * history[0][name], (name, history[0][name], history[-1][name])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    if stage == 1:
        assert not changed  # stage 1 trains the Recalibrator only
    else:
        assert changed and not any("vision" in n for n in changed)
