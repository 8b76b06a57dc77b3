"""GenRecal losses through the frozen teacher head, in chunks (docs/method.md, "Each loss term and the code that computes it").

    ce, kl = head_losses(head, recalibrated, targets, teacher=cached_features)      # exact teacher distribution
    ce, kl = head_losses(head, recalibrated, targets, teacher=TopKTarget(ids, lp, tail))  # top-k + tail bucket

    uld = uld_distance(student_logits, TopKTarget(ids, lp, tail))   # ULD baseline: no teacher head at all

`ce` is CE(head(r), gt_l) and `kl` is KL(teacher || head(r)) (forward KL, teacher first),
both averaged over positions. The head is applied `chunk_tokens` positions at a time and
each chunk's gradient with respect to r is computed right away, so no [tokens x vocab]
tensor larger than one chunk is alive in the forward or the backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.store.teacher_head import TeacherHead


@dataclass
class TopKTarget:
    """Cached teacher top-k: ids [T, k], log-probs [T, k], log of the remaining mass [T]."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_logmass: torch.Tensor

    def slice(self, s: slice) -> "TopKTarget":
        return TopKTarget(self.ids[s], self.logprobs[s], self.tail_logmass[s])

    @staticmethod
    def cat(parts: list["TopKTarget"], device) -> "TopKTarget":
        """The rows of several samples' targets, in order, on `device`."""
        return TopKTarget(*(torch.cat([getattr(p, f) for p in parts]).to(device) for f in ("ids", "logprobs", "tail_logmass")))


def head_losses(
    head: TeacherHead,
    r: torch.Tensor,
    targets: torch.Tensor,
    teacher: torch.Tensor | TopKTarget,
    chunk_tokens: int = 1024,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE, mean KL) over the T positions of r [T, d_teacher]; gradients flow into r only."""
    ce_sum, kl_sum = _ChunkedHeadLoss.apply(r, targets, teacher, head, chunk_tokens, temperature)
    n = max(len(targets), 1)
    return ce_sum / n, kl_sum / n


def chunk_losses(head: TeacherHead, x: torch.Tensor, targets, teacher, temperature: float):
    """(CE sum, KL sum) of one chunk with plain autograd ops: also the naive reference when used on all of r."""
    logits = head.logits(x)
    ce = F.cross_entropy(logits, targets, reduction="sum")
    student_logprobs = torch.log_softmax(logits / temperature, dim=-1)
    if isinstance(teacher, TopKTarget):
        kl = topk_tail_kl(student_logprobs, teacher)
    else:
        with torch.no_grad():
            teacher_logprobs = torch.log_softmax(head.logits(teacher) / temperature, dim=-1)
        kl = F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="sum")
    return ce, kl


def topk_tail_kl(student_logprobs: torch.Tensor, teacher: TopKTarget) -> torch.Tensor:
    """KL over k+1 buckets (the teacher's top-k tokens and everything else), summed over positions.

    The stored teacher buckets are renormalised (fp16 log-probs do not sum to exactly 1).
    """
    t_buckets = torch.cat([teacher.logprobs.float(), teacher.tail_logmass.float()[:, None]], dim=1)
    t_buckets = t_buckets - torch.logsumexp(t_buckets, dim=1, keepdim=True)
    s_top = student_logprobs.gather(1, teacher.ids.long())
    s_tail = _log1mexp(torch.logsumexp(s_top, dim=1))
    s_buckets = torch.cat([s_top, s_tail[:, None]], dim=1)
    p = t_buckets.exp()
    return torch.where(p > 0, p * (t_buckets - s_buckets), torch.zeros_like(p)).sum()


def uld_distance(student_logits: torch.Tensor, teacher: TopKTarget) -> torch.Tensor:
    """Universal Logit Distillation's distance, summed over positions: the L1 distance between the sorted
    probability vectors of the student [T, V_s] (its own vocabulary) and the teacher's cached top-k [T, k].

    Vocabularies need not match: only sorted probabilities are compared. The teacher's vector is its
    top-k probabilities followed by zeros: the cached tail mass (spread over tokens that were not stored)
    is left out, so every student probability beyond its own k-th largest counts in full. That sum is
    exact without sorting the whole student vocabulary: beyond rank k the teacher side is zero, so it
    contributes the student's remaining mass, 1 - (its top-k mass).
    """
    probs = torch.softmax(student_logits.float(), dim=-1)
    k = min(teacher.logprobs.shape[1], probs.shape[1])
    s_top = probs.topk(k, dim=-1).values
    t_sorted = teacher.logprobs.float().exp().sort(dim=-1, descending=True).values
    head_part = (s_top - t_sorted[:, :k]).abs().sum(-1) + t_sorted[:, k:].sum(-1)
    return (head_part + (1 - s_top.sum(-1)).clamp_min(0)).sum()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and very negative x; clamped away from log(0)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, targets, teacher, head, chunk_tokens, temperature):
        grad_ce, grad_kl = torch.zeros_like(r), torch.zeros_like(r)
        ce_total = r.new_zeros((), dtype=torch.float32)
        kl_total = r.new_zeros((), dtype=torch.float32)
        for start in range(0, len(r), chunk_tokens):
            s = slice(start, start + chunk_tokens)
            part = teacher.slice(s) if isinstance(teacher, TopKTarget) else teacher[s]
            with torch.enable_grad():
                x = r[s].detach().requires_grad_(True)
                ce, kl = chunk_losses(head, x, targets[s], part, temperature)
                g_ce, g_kl = _grads(ce, kl, x)
            grad_ce[s], grad_kl[s] = g_ce, g_kl
            ce_total += ce.detach()
            kl_total += kl.detach()
        ctx.save_for_backward(grad_ce, grad_kl)
        return ce_total, kl_total

    @staticmethod
    def backward(ctx, grad_ce_out, grad_kl_out):
        grad_ce, grad_kl = ctx.saved_tensors
        grad_r = grad_ce * grad_ce_out.to(grad_ce.dtype) + grad_kl * grad_kl_out.to(grad_kl.dtype)
        return grad_r, None, None, None, None, None


def _grads(ce: torch.Tensor, kl: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g_ce = torch.autograd.grad(ce, x, retain_graph=True)[0]
    g_kl = torch.autograd.grad(kl, x)[0]
    return g_ce, g_kl
