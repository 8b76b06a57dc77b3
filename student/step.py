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

import torch
import torch.nn.functional as F

from pipeline.store.teacher_head import TeacherHead
from pipeline.vlm.models import head_logits
from student.batches import StudentBatch
from student.config import LossConfig
from student.losses import TopKTarget, head_losses
from student.recalibrator import STUDENT, TEACHER, Recalibrator


def genrecal_losses(student, rec: Recalibrator, head: TeacherHead, batch: StudentBatch, stage: int, cfg: LossConfig,
                    measure_attention: bool = False, sharded: bool = False) -> dict:
    """Every loss term of the stage plus `total`, the weighted sum to backpropagate. With
    `measure_attention`, also `question_attention` (and its uniform-attention reference), a diagnostic
    that is not part of `total`."""
    with torch.set_grad_enabled(stage == 2 and torch.is_grad_enabled()):
        hidden, logits = student_forward(student, batch, stage == 2, sharded)  # stage 1: the student is frozen
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
        terms["student_ce"] = student_ce(logits, batch)
    total = cfg.ce_weight * terms["ce"] + cfg.kl_weight * terms["kl"]
    if reg_items:
        total = total + cfg.ce_weight * terms["reg_ce"] + cfg.kl_weight * terms["reg_kl"]
    if stage == 2:
        total = total + cfg.student_ce_weight * terms["student_ce"]
    terms["total"] = total
    if measure_attention:
        detached = [[(x.detach(), space) for x, space in segments] for segments in main]
        terms["question_attention"] = torch.tensor(rec.first_segment_attention(detached))
        terms["question_attention_uniform"] = torch.tensor(_uniform_first_segment_share(detached))
    return terms


def student_forward(student, batch: StudentBatch, with_logits: bool, sharded: bool = False):
    """(final hidden states [B, L, d_s], the student's logits at its answer-predicting positions
    [answer tokens in the batch, vocab] in batch order, or None).

    The call goes through the model's own forward (so FSDP's hooks run). Unsharded, the head is then
    applied to the answer-predicting positions only; an FSDP-sharded head can only run inside that
    forward, which is then asked for the span of positions that holds them (`logits_to_keep`).
    """
    rows, cols = _answer_positions(batch)
    device = batch.inputs["input_ids"].device
    rows, cols = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    first = int(cols.min())
    keep = torch.arange(first, int(cols.max()) + 1, device=device) if with_logits and sharded else 1
    out = student(**batch.inputs, output_hidden_states=True, use_cache=False, logits_to_keep=keep)
    hidden = out.hidden_states[-1]
    if not with_logits:
        return hidden, None
    # one gather: per-sample slices would each add a full-size zero gradient in the backward pass
    logits = out.logits[rows, cols - first] if sharded else head_logits(student, hidden[rows, cols])
    return hidden, logits


def student_ce(logits: torch.Tensor, batch: StudentBatch) -> torch.Tensor:
    """The student's own next-token CE on its answer tokens (its tokenizer, its head), from the
    logits `student_forward` returns."""
    targets = [t for item in batch.items for t in item.student.answer_ids]
    return F.cross_entropy(logits.float(), torch.tensor(targets, device=logits.device))


def _answer_positions(batch: StudentBatch) -> tuple[list[int], list[int]]:
    """(batch row, position) of every position whose logits predict an answer token, in batch order."""
    rows, cols = [], []
    for b, item in enumerate(batch.items):
        p, n = item.student.prompt_len, len(item.student.answer_ids)
        rows += [b] * n
        cols += range(p - 1, p + n - 1)
    return rows, cols


def _uniform_first_segment_share(samples) -> float:
    """What `first_segment_attention` would be if every position attended uniformly to its past."""
    shares = []
    for (question, _), (answer, _) in samples:
        q, n = len(question), len(answer)
        shares.append(sum(q / (q + j + 1) for j in range(n)) / n)
    return sum(shares) / len(shares)


def _head_terms(head: TeacherHead, outputs: list[torch.Tensor], items, cfg: LossConfig):
    with torch.autocast(outputs[0].device.type, enabled=False):  # the head losses run in fp32 under bf16 autocast
        return _head_terms_fp32(head, outputs, items, cfg)


def _head_terms_fp32(head: TeacherHead, outputs: list[torch.Tensor], items, cfg: LossConfig):
    r = torch.cat(outputs).float()
    targets = torch.cat([item.teacher_targets for item in items]).to(r.device)
    if cfg.teacher_distribution == "topk":
        parts = [item.teacher_topk for item in items]
        if any(p is None for p in parts):
            raise ValueError("teacher_distribution=topk needs a cache with top-k log-probs (it was written with --top-k 0)")
        teacher = TopKTarget(*(torch.cat([getattr(p, f) for p in parts]).to(r.device) for f in ("ids", "logprobs", "tail_logmass")))
    else:
        teacher = torch.cat([item.teacher_features for item in items]).to(r.device)
    return head_losses(head, r, targets, teacher, cfg.chunk_tokens, cfg.temperature)
