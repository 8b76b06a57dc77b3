"""One GenRecal loss evaluation on a batch (METHOD.md Alg. 1-3).

Main path (Alg. 1): the student's question features z_qs (every prompt position but the last)
and the teacher's cached answer-side features z_al (last prompt position + answer) form one
sequence through the Recalibrator; its answer outputs r_al go through the frozen teacher head:
CE(head(r_al), gt_l) + KL(head(z_al) || head(r_al)).
Regularizer (Alg. 2): the same with the teacher's own question features z_ql instead of z_qs,
for the samples whose cache entry has them.
Stage 2 (Alg. 3) adds the student's own CE on its answer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.features import TeacherHead
from pipeline.models import body_forward, head_logits
from student.batches import StudentBatch
from student.losses import TopKTarget, head_losses
from student.recalibrator import STUDENT, TEACHER, Recalibrator


@dataclass(frozen=True)
class LossConfig:
    """Which terms and how they are weighted."""

    teacher_distribution: str = "exact"
    """exact: head applied to cached features; topk: cached top-k plus one tail bucket."""
    regularizer: bool = True
    """Apply Alg. 2 on samples that have cached question features."""
    ce_weight: float = 1.0
    """Weight of CE(head(r_al), gt_l) (and of the regularizer's CE)."""
    kl_weight: float = 1.0
    """Weight of KL(teacher || recalibrated) (and of the regularizer's KL)."""
    student_ce_weight: float = 1.0
    """Weight of the student's own CE (stage 2)."""
    chunk_tokens: int = 1024
    """Positions per teacher-head chunk."""
    temperature: float = 1.0
    """Softmax temperature of the KL terms."""


def genrecal_losses(student, rec: Recalibrator, head: TeacherHead, batch: StudentBatch, stage: int, cfg: LossConfig) -> dict:
    """Every loss term of the stage plus `total`, the weighted sum to backpropagate."""
    with torch.set_grad_enabled(stage == 2 and torch.is_grad_enabled()):
        hidden = body_forward(student, **batch.inputs)  # stage 1: the student is frozen
    items = batch.items
    main = [[(hidden[b, : item.student.prompt_len - 1], STUDENT), (item.teacher_features, TEACHER)] for b, item in enumerate(items)]
    reg_items = [item for item in items if cfg.regularizer and item.teacher_question is not None]
    reg = [[(item.teacher_question[:-1], TEACHER), (item.teacher_features, TEACHER)] for item in reg_items]
    outputs = rec(main + reg)
    terms = {}
    terms["ce"], terms["kl"] = _head_terms(head, outputs[: len(items)], items, cfg)
    if reg_items:
        terms["reg_ce"], terms["reg_kl"] = _head_terms(head, outputs[len(items) :], reg_items, cfg)
    if stage == 2:
        terms["student_ce"] = student_ce(student, hidden, batch)
    total = cfg.ce_weight * terms["ce"] + cfg.kl_weight * terms["kl"]
    if reg_items:
        total = total + cfg.ce_weight * terms["reg_ce"] + cfg.kl_weight * terms["reg_kl"]
    if stage == 2:
        total = total + cfg.student_ce_weight * terms["student_ce"]
    terms["total"] = total
    return terms


def _head_terms(head: TeacherHead, outputs: list[torch.Tensor], items, cfg: LossConfig):
    r = torch.cat(outputs)
    targets = torch.cat([item.teacher_targets for item in items]).to(r.device)
    if cfg.teacher_distribution == "topk":
        parts = [item.teacher_topk for item in items]
        if any(p is None for p in parts):
            raise ValueError("teacher_distribution=topk needs a cache with top-k log-probs (it was written with --top-k 0)")
        teacher = TopKTarget(*(torch.cat([getattr(p, f) for p in parts]).to(r.device) for f in ("ids", "logprobs", "tail_logmass")))
    else:
        teacher = torch.cat([item.teacher_features for item in items]).to(r.device)
    return head_losses(head, r, targets, teacher, cfg.chunk_tokens, cfg.temperature)


def student_ce(student, hidden: torch.Tensor, batch: StudentBatch) -> torch.Tensor:
    """The student's own next-token CE on its answer tokens (its tokenizer, its head)."""
    rows, targets = [], []
    for b, item in enumerate(batch.items):
        p, n = item.student.prompt_len, len(item.student.answer_ids)
        rows.append(hidden[b, p - 1 : p + n - 1])
        targets.append(torch.tensor(item.student.answer_ids, device=hidden.device))
    logits = head_logits(student, torch.cat(rows)).float()
    return F.cross_entropy(logits, torch.cat(targets))
