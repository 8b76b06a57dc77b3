"""One VLsI loss evaluation on a batch (the method and its stages: student/vlsi.py).

Stage 1 (both backbones frozen):
  teacher_verbalizer_ce = mean over cached teacher layers L of CE(teacher head(V_L(z_L)), gt_l)
  student_verbalizer_ce = mean over student layers l of CE(student head(V_l(h_l)), gt_s)
Stage 2 (the student and its verbalizers train; the teacher's verbalizers are frozen):
  layer_kl   = mean over student layers l of KL(teacher head(V_m(l)(z_m(l))) || student head(V_l(h_l)))
               with m the order-preserving matching (student/vlsi.py `match_layers`, on this batch's KLs)
  last_kl    = KL(teacher head(z_final) || student logits)   (--teacher-distribution topk: the cached top-k + tail)
  student_ce = the student's CE on its answer tokens
  total      = verbalizer_kl_weight * layer_kl + kd_weight * last_kl + student_ce_weight * student_ce
  match_s{l} = the teacher layer (hidden_states index) student layer l matched on this batch; a metric, not a
               loss (with --grad-accum or several ranks, metrics.jsonl holds its mean over the step's micro-batches)

Every head term goes through student/losses.py: the verbalizer terms in chunks with the head frozen
(`head_losses`; the teacher side of a KL is a constant `HeadTarget`), the last-layer terms on the student's
own logits (`logit_losses`, plain autograd: its head trains through them). Both vocabularies are cut to the
shared tokenizer's size (heads may carry padding rows beyond it). Teacher rows and student rows are paired by
index within each answer, cut to the shorter one and where the two sides' ids first differ (student/step.py
`paired_rows`; `paired_share` logs the share of teacher tokens paired); the CE terms use each side's whole answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pipeline.store.teacher_head import TeacherHead
from pipeline.vlm.models import lm_head_and_scaling
from student.batches import StudentBatch
from student.losses import HeadTarget, TopKTarget, head_loss_values, head_losses, logit_losses
from student.step import answer_hidden, paired_rows, paired_share, student_ce, student_forward_all
from student.vlsi import Verbalizers, match_layers

if TYPE_CHECKING:  # annotations only: config.py imports student/methods.py, which runs this module's losses
    from student.config import LossConfig


@dataclass
class VLsIParts:
    """What a VLsI stage trains with, set up by student/vlsi_train.py `set_up_verbalizers`."""

    teacher: Verbalizers  # one per cached teacher layer
    student: Verbalizers  # one per chosen student layer
    vocab: int  # the shared tokenizer's size: both heads' logits are cut to it
    window: int  # match_window
    train_teacher: bool  # stage 1 without --teacher-verbalizers


def vlsi_losses(student, parts: VLsIParts, head: TeacherHead, batch: StudentBatch, stage: int, cfg: LossConfig) -> dict:
    """Every term of the stage plus `total`; stage 2 also `match_s{l}`: the teacher layer student layer l matched."""
    with torch.set_grad_enabled(stage == 2 and torch.is_grad_enabled()):  # stage 1: the student is frozen
        hidden_states, logits = student_forward_all(student, batch, stage == 2)
    s_hidden = {layer: answer_hidden(hidden_states[layer], batch) for layer in parts.student.layers}
    s_head = student_head(student)
    items = batch.items
    with torch.autocast(s_hidden[parts.student.layers[0]].device.type, enabled=False):  # head terms in fp32
        if stage == 1:
            targets = torch.cat([item.teacher_targets for item in items]).to(s_head.weight.device)
            s_targets = torch.tensor([t for item in items for t in item.student.answer_ids], device=targets.device)
            with torch.set_grad_enabled(parts.train_teacher and torch.is_grad_enabled()):
                t_ce = teacher_verbalizer_ce(parts.teacher, head, teacher_layer_rows(items, parts.teacher.layers),
                                             targets, parts.vocab, cfg.chunk_tokens)
            s_ce = verbalizer_ce(parts.student, s_head, s_hidden, s_targets, parts.vocab, cfg.chunk_tokens)
            total = s_ce + t_ce if parts.train_teacher else s_ce
            return {"teacher_verbalizer_ce": t_ce, "student_verbalizer_ce": s_ce, "total": total}
        s_rows, t_rows = (torch.tensor(r, dtype=torch.long, device=logits.device)
                          for r in paired_rows(batch, same_tokens=True))
        with torch.no_grad():
            layers = teacher_layer_rows(items, parts.teacher.layers)
            t_verbalized = [parts.teacher[layer](layers[layer].to(logits.device)[t_rows]) for layer in parts.teacher.layers]
        s_verbalized = [parts.student[layer](s_hidden[layer][s_rows]) for layer in parts.student.layers]
        layer_kl, matches = matched_layer_kl(head, s_head, t_verbalized, s_verbalized, parts.window, parts.vocab,
                                             cfg.chunk_tokens, cfg.temperature)
        last_kl = last_layer_kl(head, logits[s_rows].float(), items, t_rows, cfg, parts.vocab)
    terms = {"layer_kl": layer_kl, "last_kl": last_kl, "student_ce": student_ce(logits, batch),
             "paired_share": paired_share(batch, t_rows)}
    terms["total"] = (cfg.verbalizer_kl_weight * layer_kl + cfg.kd_weight * last_kl
                      + cfg.student_ce_weight * terms["student_ce"])
    for s_layer, j in zip(parts.student.layers, matches):
        terms[f"match_s{s_layer}"] = torch.tensor(float(parts.teacher.layers[j]))
    return terms


def teacher_layer_rows(items, layers: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Each cached teacher layer's rows of the batch, concatenated in batch order ([sum of n, d_teacher])."""
    if any(item.teacher_layers is None for item in items):
        raise ValueError("--method vlsi needs the cache's intermediate teacher layers in every sample")
    return {layer: torch.cat([item.teacher_layers[layer] for item in items]) for layer in layers}


def teacher_verbalizer_ce(verbalizers: Verbalizers, head: TeacherHead, layer_rows: dict[int, torch.Tensor],
                          targets: torch.Tensor, vocab: int, chunk_tokens: int = 1024) -> torch.Tensor:
    """Stage 1, teacher side: mean over layers of CE(teacher head(V_L(z_L)), gt_l), from features of the
    teacher's layers (the cache's, or a live forward's: they are trained the same either way)."""
    device = head.weight.device
    return verbalizer_ce(verbalizers, head, {k: v.to(device) for k, v in layer_rows.items()}, targets.to(device),
                         vocab, chunk_tokens)


def verbalizer_ce(verbalizers: Verbalizers, head, hidden: dict[int, torch.Tensor], targets: torch.Tensor, vocab: int,
                  chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean over the verbalizers' layers of the CE of head(V_l(hidden[l])) against `targets`, in head chunks
    (values only when no gradient is wanted, e.g. frozen teacher verbalizers: the chunked loss would compute
    each chunk's gradient anyway)."""
    losses = head_losses if torch.is_grad_enabled() else head_loss_values
    ces = [losses(head, verbalizers[layer](hidden[layer]), targets, None, chunk_tokens, vocab=vocab)[0]
           for layer in verbalizers.layers]
    return torch.stack(ces).mean()


def matched_layer_kl(t_head, s_head, t_verbalized: list[torch.Tensor], s_verbalized: list[torch.Tensor], window: int,
                     vocab: int, chunk_tokens: int = 1024, temperature: float = 1.0) -> tuple[torch.Tensor, list[int]]:
    """(mean over student layers of KL(teacher verbalized || student verbalized) at the matched teacher layer,
    the matches: positions in the teacher's layer list). The matching asks for the candidates' KL values alone
    (no gradient); the matched pairs' KL then runs through the chunked head loss with its gradient."""
    targets = [HeadTarget(t_head, t) for t in t_verbalized]

    def kl(i: int, j: int) -> float:
        return head_loss_values(s_head, s_verbalized[i].detach(), None, targets[j], chunk_tokens, temperature,
                                vocab)[1].item()

    matches = match_layers(kl, len(s_verbalized), len(t_verbalized), window)
    kls = [head_losses(s_head, s, None, targets[j], chunk_tokens, temperature, vocab)[1]
           for s, j in zip(s_verbalized, matches)]
    return torch.stack(kls).mean(), matches


def last_layer_kl(head: TeacherHead, s_logits: torch.Tensor, items, t_rows: torch.Tensor, cfg: LossConfig,
                  vocab: int) -> torch.Tensor:
    """KL(teacher || student) at the paired final-layer rows: the teacher head on the cached final features
    (exact), or the cached top-k + tail (`teacher_distribution=topk`); plain autograd on the student's logits."""
    device = s_logits.device
    if cfg.teacher_distribution == "topk":
        if any(item.teacher_topk is None for item in items):
            raise ValueError("teacher_distribution=topk needs a cache with top-k log-probs (it was written with --top-k 0)")
        teacher = TopKTarget.cat([item.teacher_topk for item in items], device).slice(t_rows)
    else:
        teacher = HeadTarget(head, torch.cat([item.teacher_features for item in items]).to(device)[t_rows])
    kl = s_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, len(t_rows), cfg.chunk_tokens):  # the teacher's logits one chunk of rows at a time
        rows = slice(start, start + cfg.chunk_tokens)
        kl = kl + logit_losses(s_logits[rows], None, teacher.slice(rows), cfg.temperature, vocab)[1]
    return kl / max(len(t_rows), 1)


def student_head(student) -> TeacherHead:
    """The student's own head as a frozen head for its verbalizers (the live weights, detached: the verbalizer
    path trains the states it reads, not the head; the head trains through the last-layer terms)."""
    module, scale, softcap = lm_head_and_scaling(student)
    bias = getattr(module, "bias", None)
    return TeacherHead(module.weight.detach(), None if bias is None else bias.detach(), scale, softcap)
