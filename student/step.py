"""One GenRecal loss evaluation on a batch (docs/method.md, Alg. 1-3).

The cache holds, per sample, the teacher's features z_al at [last prompt position, a_0 .. a_{n-2}] (n rows)
and the targets gt_l = [a_0 .. a_{n-1}]. The Recalibrator's outputs at n positions go through the frozen
teacher head: CE(head(r), gt_l) + KL(head(z_al) || head(r)). What stands at those n positions is the layout
(student/layouts.py declares each: student-last-prompt, the default; teacher-last-prompt; teacher-tokens).
The regularizer (Alg. 2) feeds the teacher's own prompt features z_ql, then the layout's answer part, for the
samples that have z_ql.
Stage 2 (Alg. 3) adds the student's own CE on its answer tokens.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from pipeline.store.teacher_head import TeacherHead
from pipeline.vlm.models import head_logits
from pipeline.vlm.parts import model_inputs
from student.batches import StudentBatch
from student.diagnostics import question_reliance
from student.losses import HeadTarget, TopKTarget, logit_losses, uld_distance, weighted_head_loss
from student.layouts import layout_named, regularizer_segments
from student.recalibrator import Recalibrator

if TYPE_CHECKING:  # annotations only: config.py imports student/methods.py, which runs this module's losses
    from student.config import LossConfig


def genrecal_losses(student, rec: Recalibrator, head: TeacherHead, batch: StudentBatch, stage: int, cfg: LossConfig,
                    measure_reliance: bool = False, sharded: bool = False) -> dict:
    """Every loss term of the stage plus `total`, the weighted sum to backpropagate. With
    `measure_reliance`, also the question-reliance diagnostics (student/diagnostics.py), which are not
    part of `total`."""
    with torch.set_grad_enabled(stage == 2 and torch.is_grad_enabled()):
        hidden, logits = student_forward(student, batch, stage == 2, sharded)  # stage 1: the student is frozen
    items = batch.items
    layout = layout_named(cfg.layout)
    main = layout.segments(hidden, items, rec)
    reg_items = [item for item in items if cfg.regularizer and item.teacher_question is not None]
    reg = regularizer_segments(reg_items, layout, rec)
    outputs = rec(main + reg, [len(item.teacher_features) for item in items + reg_items])
    groups = [(outputs[: len(items)], items)] + ([(outputs[len(items) :], reg_items)] if reg_items else [])
    total, values = head_terms(head, groups, cfg)
    terms = {"ce": values[0][0], "kl": values[0][1]}  # values for the log; `total` carries the gradient
    if reg_items:
        terms["reg_ce"], terms["reg_kl"] = values[1]
    if stage == 2:
        terms["student_ce"] = student_ce(logits, batch)
        total = total + cfg.student_ce_weight * terms["student_ce"]
    terms["total"] = total
    if measure_reliance:
        terms.update(question_reliance(rec, head, [[(x.detach(), s) for x, s in seg] for seg in main], items))
    return terms


def uld_losses(student, batch: StudentBatch, cfg: LossConfig, sharded: bool = False) -> dict:
    """The ULD baseline (`--method uld`, no Recalibrator, no teacher head): the student's own CE plus the
    ULD distance between its answer-position distributions and the teacher's cached top-k, positions
    paired by index within each answer and cut to the shorter of the two (student/losses.py `uld_distance`)."""
    _, logits = student_forward(student, batch, True, sharded)
    rows, teacher = paired_topk(batch, logits.device, "--method uld")
    terms = {"student_ce": student_ce(logits, batch)}
    with torch.autocast(logits.device.type, enabled=False):  # one gather (see student_forward), fp32 distance
        terms["uld"] = uld_distance(logits[rows], teacher) / max(len(rows), 1)
    terms["total"] = cfg.student_ce_weight * terms["student_ce"] + cfg.uld_weight * terms["uld"]
    return terms


def kd_losses(student, batch: StudentBatch, cfg: LossConfig, sharded: bool = False, vocab: int | None = None) -> dict:
    """Plain logit KD (`--method kd`, a student with the teacher's tokenizer; no Recalibrator, no teacher head):
    the student's own CE plus `kd_weight` x KL(teacher || student), forward KL, over the k+1 buckets of the
    cached top-k ids and one tail bucket (student/losses.py `logit_losses` -> `topk_tail_kl`, the same term as
    GenRecal's `--teacher-distribution topk`). Positions are paired by index, cut to the shorter answer and at
    the first position where the two sides' ids differ (`paired_share`: the share of teacher tokens paired).
    The cached log-probs are at the cache's top-k temperature and `temperature` divides the student's logits:
    student/train.py lets a run through only when the two agree. `vocab`: the shared tokenizer's size; the
    student head's padding rows beyond it are left out of its softmax, as VLsI does."""
    _, logits = student_forward(student, batch, True, sharded)
    rows, teacher = paired_topk(batch, logits.device, "--method kd", same_tokens=True)
    terms = {"student_ce": student_ce(logits, batch), "paired_share": paired_share(batch, rows)}
    with torch.autocast(logits.device.type, enabled=False):
        _, kl = logit_losses(logits[rows].float(), None, teacher, cfg.temperature, vocab)
    terms["kd"] = kl / max(len(rows), 1)
    terms["total"] = cfg.student_ce_weight * terms["student_ce"] + cfg.kd_weight * terms["kd"]
    return terms


def paired_rows(batch: StudentBatch, same_tokens: bool = False) -> tuple[list[int], list[int]]:
    """(rows of the student's answer-position logits, rows of the teacher's cached arrays) paired by index
    within each answer, cut to the shorter of the two answers: row t of both predicts answer token t.

    `same_tokens` (kd, vlsi: one tokenizer on both sides): cut each answer where the two id sequences first
    differ (the student's template re-encodes the answer text, which need not give the ids the teacher
    generated); from there on the two sides predict other tokens in other contexts."""
    s_rows, t_rows = [], []
    s_start = t_start = 0
    for item in batch.items:
        n_s, n_t = len(item.student.answer_ids), len(item.teacher_targets)
        n = min(n_s, n_t)
        if same_tokens:
            n = _common_prefix(item.student.answer_ids, item.teacher_targets.tolist(), n)
        s_rows.extend(range(s_start, s_start + n))
        t_rows.extend(range(t_start, t_start + n))
        s_start, t_start = s_start + n_s, t_start + n_t
    return s_rows, t_rows


def _common_prefix(a, b, n: int) -> int:
    """The number of leading positions (at most n) where sequences a and b hold the same id."""
    for t in range(n):
        if int(a[t]) != int(b[t]):
            return t
    return n


def paired_share(batch: StudentBatch, t_rows) -> torch.Tensor:
    """The share of the teacher's answer tokens that got a student row (1.0 when every answer pairs in full)."""
    return torch.tensor(len(t_rows) / max(sum(len(item.teacher_targets) for item in batch.items), 1))


def paired_topk(batch: StudentBatch, device, what: str, same_tokens: bool = False) -> tuple[torch.Tensor, TopKTarget]:
    """(student logit rows, the teacher's cached top-k at the paired rows), see `paired_rows`. `what`: the loss that
    needs them, for the error without top-k."""
    if any(item.teacher_topk is None for item in batch.items):
        raise ValueError(f"{what} needs a cache with top-k log-probs (it was written with --top-k 0)")
    s_rows, t_rows = paired_rows(batch, same_tokens=same_tokens)
    teacher = TopKTarget.cat([item.teacher_topk for item in batch.items], device)
    t_rows = torch.tensor(t_rows, dtype=torch.long, device=device)
    return torch.tensor(s_rows, dtype=torch.long, device=device), teacher.slice(t_rows)


def student_forward(student, batch: StudentBatch, with_logits: bool, sharded: bool = False):
    """(final hidden states [B, L, d_s], the student's logits at its answer-predicting positions
    [answer tokens in the batch, vocab] in batch order, or None).

    The call goes through the model's own forward (so FSDP's hooks run). Unsharded, the head is then
    applied to the answer-predicting positions only; an FSDP-sharded head can only run inside that
    forward, which is then asked for the span of positions that holds them (`logits_to_keep`).
    """
    hidden_states, logits = student_forward_all(student, batch, with_logits, sharded)
    return hidden_states[-1], logits


def student_forward_all(student, batch: StudentBatch, with_logits: bool, sharded: bool = False):
    """`student_forward` with every layer's hidden states: (transformers' hidden_states tuple, logits or None)."""
    rows, cols = _answer_positions(batch)
    device = batch.inputs["input_ids"].device
    rows, cols = torch.tensor(rows, device=device), torch.tensor(cols, device=device)
    first = int(cols.min())
    keep = torch.arange(first, int(cols.max()) + 1, device=device) if with_logits and sharded else 1
    inputs = model_inputs(student, batch.inputs)  # processors' extra keys (labels, ...) stay out
    out = student(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=keep)
    if not with_logits:
        return out.hidden_states, None
    # one gather: per-sample slices would each add a full-size zero gradient in the backward pass
    logits = out.logits[rows, cols - first] if sharded else head_logits(student, out.hidden_states[-1][rows, cols])
    return out.hidden_states, logits


def student_ce(logits: torch.Tensor, batch: StudentBatch) -> torch.Tensor:
    """The student's own next-token CE on its answer tokens (its tokenizer, its head), from the
    logits `student_forward` returns."""
    targets = [t for item in batch.items for t in item.student.answer_ids]
    return F.cross_entropy(logits.float(), torch.tensor(targets, device=logits.device))


def answer_hidden(hidden: torch.Tensor, batch: StudentBatch) -> torch.Tensor:
    """The rows of `hidden` [B, L, d] at the answer-predicting positions, [answer tokens in the batch, d], in
    batch order (the rows `student_forward`'s logits come from)."""
    rows, cols = _answer_positions(batch)
    return hidden[torch.tensor(rows, device=hidden.device), torch.tensor(cols, device=hidden.device)]


def _answer_positions(batch: StudentBatch) -> tuple[list[int], list[int]]:
    """(batch row, position) of every position whose logits predict an answer token, in batch order."""
    rows, cols = [], []
    for b, item in enumerate(batch.items):
        p, n = item.student.prompt_len, len(item.student.answer_ids)
        rows += [b] * n
        cols += range(p - 1, p + n - 1)
    return rows, cols


def head_terms(head: TeacherHead, groups: list[tuple[list[torch.Tensor], list]], cfg: LossConfig):
    """(the sum over groups of ce_weight x mean CE + kl_weight x mean KL, with its gradient; each group's (mean CE,
    mean KL) values, detached, for the log). A group is (Recalibrator outputs, their items): the main path, then
    the regularizer's. All rows go through the head together (student/losses.py `weighted_head_loss`: one forward
    and one backward head matmul per chunk for both terms and both groups; a sample in both groups has its teacher
    logits computed once). The head losses run in fp32 under bf16 autocast."""
    with torch.autocast(groups[0][0][0].device.type, enabled=False):
        return _head_terms_fp32(head, groups, cfg)


def _head_terms_fp32(head: TeacherHead, groups, cfg: LossConfig):
    r = torch.cat([out for outputs, _ in groups for out in outputs]).float()
    items = [item for _, group_items in groups for item in group_items]
    targets = torch.cat([item.teacher_targets for item in items]).to(r.device)
    sizes = [sum(len(out) for out in outputs) for outputs, _ in groups]
    # each group is a mean over its own rows: a row's weight is the term's weight over its group's row count
    per_row = torch.cat([torch.full((n,), 1.0 / max(n, 1), device=r.device) for n in sizes])
    total, ce_rows, kl_rows = weighted_head_loss(head, r, targets, _teacher_of(head, items, r.device, cfg),
                                                 cfg.ce_weight * per_row, cfg.kl_weight * per_row, cfg.chunk_tokens,
                                                 cfg.temperature)
    values = [(ce.sum() / max(n, 1), kl.sum() / max(n, 1))
              for n, ce, kl in zip(sizes, ce_rows.split(sizes), kl_rows.split(sizes))]
    return total, values


def _teacher_of(head: TeacherHead, items, device, cfg: LossConfig):
    """The teacher's distribution at every row: the cached top-k, or the head on the cached features, each
    sample's features once (HeadTarget.rows: the regularizer's rows of a sample read the main path's)."""
    if cfg.teacher_distribution == "topk":
        parts = [item.teacher_topk for item in items]
        if any(p is None for p in parts):
            raise ValueError("teacher_distribution=topk needs a cache with top-k log-probs (it was written with --top-k 0)")
        return TopKTarget.cat(parts, device)
    first = {}  # id(item) -> its first row in `features`
    features, rows, start = [], [], 0
    for item in items:
        n = len(item.teacher_features)
        if id(item) not in first:
            first[id(item)] = start
            features.append(item.teacher_features)
            start += n
        rows.append(torch.arange(first[id(item)], first[id(item)] + n))
    shared = len(features) < len(items)  # else every row reads its own feature row: no index needed
    return HeadTarget(head, torch.cat(features).to(device), torch.cat(rows).to(device) if shared else None)
