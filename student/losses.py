"""GenRecal losses through the frozen teacher head, in chunks (docs/method.md, "Each loss term and the code that computes it").

    ce, kl = head_losses(head, recalibrated, targets, teacher=cached_features)      # exact teacher distribution
    ce, kl = head_losses(head, recalibrated, targets, teacher=TopKTarget(ids, lp, tail))  # top-k + tail bucket

    uld = uld_distance(student_logits, TopKTarget(ids, lp, tail))   # ULD baseline: no teacher head at all

    # VLsI: the teacher's distribution from other features through another head (a constant); CE left out
    _, kl = head_losses(student_head, verbalized, None, HeadTarget(teacher_head, teacher_verbalized), vocab=V)
    _, kl = logit_losses(student_logits, None, TopKTarget(...), temperature)   # plain KD on given logits

`ce` is CE(head(r), gt_l) and `kl` is KL(teacher || head(r)) (forward KL, teacher first),
both averaged over positions. The head is applied `chunk_tokens` positions at a time and
each chunk's gradient with respect to r is computed right away, so no [tokens x vocab]
tensor larger than one chunk is alive in the forward or the backward pass. The head's own
weights get no gradient on this path (it is frozen). `vocab` cuts both sides' logits to their
first `vocab` ids before the softmax (heads with padding rows beyond the shared tokenizer).
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


@dataclass
class HeadTarget:
    """A teacher distribution from `features` [T, d] through their own `head` (anything with `.logits`,
    e.g. a TeacherHead): softmax(head.logits(features)[:, :vocab] / temperature), computed chunk by chunk
    and held constant (no gradient reaches the features or the head)."""

    head: object
    features: torch.Tensor

    def slice(self, s: slice) -> "HeadTarget":
        return HeadTarget(self.head, self.features[s])


def head_losses(
    head: TeacherHead,
    r: torch.Tensor,
    targets: torch.Tensor | None,
    teacher: torch.Tensor | TopKTarget | HeadTarget | None,
    chunk_tokens: int = 1024,
    temperature: float = 1.0,
    vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE, mean KL) over the T positions of r [T, d]; gradients flow into r only. `teacher`: cached
    features through the same head, the cached top-k + tail, features through another head (HeadTarget),
    or None (no KL: 0). `targets` None: no CE (0)."""
    ce_sum, kl_sum = _ChunkedHeadLoss.apply(r, targets, teacher, head, chunk_tokens, temperature, vocab)
    n = max(len(r), 1)
    return ce_sum / n, kl_sum / n


@torch.no_grad()
def head_loss_values(head, r, targets, teacher, chunk_tokens: int = 1024, temperature: float = 1.0,
                     vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The values of `head_losses` alone, chunk by chunk, without any gradient (e.g. to choose a term)."""
    ce, kl = r.new_zeros((), dtype=torch.float32), r.new_zeros((), dtype=torch.float32)
    for start in range(0, len(r), chunk_tokens):
        s = slice(start, start + chunk_tokens)
        c, k = chunk_losses(head, r[s], None if targets is None else targets[s], _slice(teacher, s), temperature, vocab)
        ce, kl = ce + c, kl + k
    n = max(len(r), 1)
    return ce / n, kl / n


def chunk_losses(head: TeacherHead, x: torch.Tensor, targets, teacher, temperature: float, vocab: int | None = None):
    """(CE sum, KL sum) of one chunk with plain autograd ops: also the naive reference when used on all of r."""
    if isinstance(teacher, torch.Tensor):  # cached features through the same head
        teacher = HeadTarget(head, teacher)
    return logit_losses(head.logits(x), targets, teacher, temperature, vocab)


def logit_losses(logits: torch.Tensor, targets, teacher: TopKTarget | HeadTarget | None, temperature: float,
                 vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(CE sum, KL(teacher || softmax(logits / temperature)) sum) of given logits [T, V], plain autograd.
    `vocab`: only the first `vocab` ids of either side count (the teacher's HeadTarget logits are cut too)."""
    if vocab is not None:
        logits = logits[:, :vocab]
    zero = logits.new_zeros((), dtype=torch.float32)
    ce = zero if targets is None else F.cross_entropy(logits, targets, reduction="sum")
    if teacher is None:
        return ce, zero
    student_logprobs = torch.log_softmax(logits / temperature, dim=-1)
    if isinstance(teacher, TopKTarget):
        return ce, topk_tail_kl(student_logprobs, teacher)
    with torch.no_grad():
        teacher_logits = teacher.head.logits(teacher.features)
        if vocab is not None:
            teacher_logits = teacher_logits[:, :vocab]
        teacher_logprobs = torch.log_softmax(teacher_logits / temperature, dim=-1)
    return ce, F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="sum")


def _slice(teacher, s: slice):
    return None if teacher is None else teacher.slice(s) if isinstance(teacher, (TopKTarget, HeadTarget)) else teacher[s]


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
    def forward(ctx, r, targets, teacher, head, chunk_tokens, temperature, vocab):
        grad_ce, grad_kl = torch.zeros_like(r), torch.zeros_like(r)
        ce_total = r.new_zeros((), dtype=torch.float32)
        kl_total = r.new_zeros((), dtype=torch.float32)
        for start in range(0, len(r), chunk_tokens):
            s = slice(start, start + chunk_tokens)
            with torch.enable_grad():
                x = r[s].detach().requires_grad_(True)
                ce, kl = chunk_losses(head, x, None if targets is None else targets[s], _slice(teacher, s),
                                      temperature, vocab)
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
        return grad_r, None, None, None, None, None, None


def _grads(ce: torch.Tensor, kl: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d ce / dx and d kl / dx; a term that was not computed (a constant 0) has a zero gradient."""
    g_ce = torch.autograd.grad(ce, x, retain_graph=True)[0] if ce.requires_grad else torch.zeros_like(x)
    g_kl = torch.autograd.grad(kl, x)[0] if kl.requires_grad else torch.zeros_like(x)
    return g_ce, g_kl
