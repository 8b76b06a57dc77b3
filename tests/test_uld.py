"""The ULD baseline on a real cache (Qwen2 teacher, 152k vocabulary -> Mistral-tokenizer student, 32k)."""

import pytest
import torch

from pipeline.vlm.models import load_vlm
from student.batches import CacheStudentData
from student.config import LossConfig
from student.step import uld_losses
from tests.test_student_losses import _plain_uld


def _batch(cache, student):
    data = CacheStudentData(cache, student.processor, student.end_of_turn, student.pad_id)
    return data.collate([data[i] for i in range(len(data))])


@torch.no_grad()
def test_uld_term_equals_a_per_sample_reference(pair_cache, pair_student):
    batch = _batch(pair_cache, pair_student)
    first, second = batch.items[0], batch.items[1]  # answers of unequal length on each side: the cut is exercised
    first.teacher_targets, first.teacher_topk = first.teacher_targets[:-1], first.teacher_topk.slice(slice(0, -1))
    repeat = torch.cat([torch.arange(len(second.teacher_targets)), torch.tensor([len(second.teacher_targets) - 1])])
    second.teacher_targets = second.teacher_targets[repeat]
    second.teacher_topk = second.teacher_topk.slice(repeat)
    model = pair_student.model
    terms = uld_losses(model, batch, LossConfig())
    logits = model(**batch.inputs).logits.float()
    total, positions = 0.0, 0
    for b, item in enumerate(batch.items):
        p, n_s = item.student.prompt_len, len(item.student.answer_ids)
        n = min(n_s, len(item.teacher_targets))  # paired by index, cut to the shorter answer
        total += _plain_uld(logits[b, p - 1 : p - 1 + n], item.teacher_topk.logprobs[:n].float())
        positions += n
    assert len(first.teacher_targets) < len(first.student.answer_ids) < len(second.teacher_targets)
    torch.testing.assert_close(terms["uld"], total / positions, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(terms["total"], terms["student_ce"] + terms["uld"])


def test_training_on_uld_lowers_it(pair_cache, pair_student):
    torch.manual_seed(0)
    batch = _batch(pair_cache, pair_student)
    model = load_vlm(pair_student.path).model
    params = list(model.model.language_model.parameters()) + list(model.lm_head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    history = []
    for _ in range(15):
        terms = uld_losses(model, batch, LossConfig(student_ce_weight=0.0))
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        history.append(terms["uld"].item())
    assert history[-1] < 0.7 * history[0], history


def test_method_uld_is_a_stage_2_run_without_recalibrator(tmp_path, pair_cache, pair_student):
    from pathlib import Path

    from safetensors.torch import load_file

    from student.config import TrainConfig
    from student.train import train_stage

    cfg = TrainConfig(cache=str(pair_cache), student=str(pair_student.path), out=str(tmp_path / "uld"), stage=2,
                      method="uld", steps=2, batch_size=4, lr=1e-3, num_workers=0)
    metrics = train_stage(cfg, progress=False)
    assert set(metrics[0]) >= {"student_ce", "uld", "total"} and "ce" not in metrics[0]
    assert all(torch.isfinite(torch.tensor(m["uld"])) for m in metrics)
    out = tmp_path / "uld" / "stage2"
    assert not (out / "recalibrator").exists()
    (before,) = Path(pair_student.path).glob("model*.safetensors")
    (after,) = out.glob("model*.safetensors")
    old, new = load_file(str(before)), load_file(str(after))
    changed = [k for k in new if not torch.equal(old[k], new[k])]
    assert changed and not any("vision_tower" in k for k in changed)
    with pytest.raises(ValueError, match="stage-2 run"):
        TrainConfig(cache=str(pair_cache), student="s", out="o", stage=1, method="uld")
