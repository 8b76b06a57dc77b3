"""GenRecal losses through the frozen teacher head, in chunks (docs/method.md, "Each loss term and the code that computes it").

    ce, kl = head_losses(head, recalibrated, targets, teacher=cached_features)      # exact teacher distribution
    ce, kl = head_losses(head, recalibrated, targets, teacher=TopKTarget(ids, lp, tail))  # top-k + tail bucket

    uld = uld_distance(student_logits, TopKTarget(ids, lp, tail))   # ULD baseline: no teacher head at all

    # GenRecal's step: the weights known, one backward head pass for both terms (per-position weights)
    total, ce_rows, kl_rows = weighted_head_loss(head, r, targets, teacher, ce_weights, kl_weights)

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
    rows: torch.Tensor | None = None  # the feature row of each position (None: row t for position t); positions that
    # read one row (the regularizer's and the main path's of one sample) get its logits from one head pass

    def slice(self, s: slice) -> "HeadTarget":
        if self.rows is None:
            return HeadTarget(self.head, self.features[s])
        return HeadTarget(self.head, self.features, self.rows[s])

    def logits(self, vocab: int | None = None) -> torch.Tensor:
        """The teacher's logits [T, vocab] (no gradient), each distinct feature row through the head once."""
        with torch.no_grad():
            if self.rows is None:
                logits = self.head.logits(self.features)
            else:
                distinct, inverse = self.rows.unique(return_inverse=True)
                logits = self.head.logits(self.features[distinct])[inverse]
        return logits if vocab is None else logits[:, :vocab]


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
        teacher_logprobs = torch.log_softmax(teacher.logits(vocab) / temperature, dim=-1)
    return ce, F.kl_div(student_logprobs, teacher_logprobs, log_target=True, reduction="sum")


def _slice(teacher, s: slice):
    return None if teacher is None else teacher.slice(s) if isinstance(teacher, (TopKTarget, HeadTarget)) else teacher[s]


def topk_tail_kl(student_logprobs: torch.Tensor, teacher: TopKTarget) -> torch.Tensor:
    """KL over k+1 buckets (the teacher's top-k tokens and everything else), summed over positions.

    The stored teacher buckets are renormalised (fp16 log-probs do not sum to exactly 1).
    """
    return topk_tail_kl_rows(student_logprobs, teacher).sum()


def topk_tail_kl_rows(student_logprobs: torch.Tensor, teacher: TopKTarget) -> torch.Tensor:
    """`topk_tail_kl` of each position [T]."""
    t_buckets = torch.cat([teacher.logprobs.float(), teacher.tail_logmass.float()[:, None]], dim=1)
    t_buckets = t_buckets - torch.logsumexp(t_buckets, dim=1, keepdim=True)
    s_top = student_logprobs.gather(1, teacher.ids.long())
    s_tail = _log1mexp(torch.logsumexp(s_top, dim=1))
    s_buckets = torch.cat([s_top, s_tail[:, None]], dim=1)
    p = t_buckets.exp()
    return torch.where(p > 0, p * (t_buckets - s_buckets), torch.zeros_like(p)).sum(-1)


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


# -- the weighted loss: both terms' gradients in one backward head pass ----------------------------------------

def weighted_head_loss(head: TeacherHead, r: torch.Tensor, targets: torch.Tensor | None,
                       teacher: torch.Tensor | TopKTarget | HeadTarget | None, ce_weights: torch.Tensor,
                       kl_weights: torch.Tensor, chunk_tokens: int = 1024, temperature: float = 1.0,
                       vocab: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum over positions of ce_weights[t] * CE_t + kl_weights[t] * KL_t, with its gradient into r; CE_t [T] and
    KL_t [T], detached, for the log): the terms of `head_losses`, weighted per position.

    Why: `head_losses` returns CE and KL apart, so it must keep their gradients apart, one backward pass through
    the head each. The caller's weights known, one pass carries both: per chunk one forward matmul for r (and one
    for the teacher's logits, each distinct feature row once, see HeadTarget.rows) and one backward matmul, the
    logit gradient of the exact teacher distribution written out (softmax minus target) instead of taken through
    autograd's log-softmax, KL and CE. Per-position weights let several groups of rows (the main path and the
    regularizer, each a mean over its own rows) share the chunks."""
    if isinstance(teacher, torch.Tensor):
        teacher = HeadTarget(head, teacher)
    total, ce_rows, kl_rows = _WeightedHeadLoss.apply(r, targets, teacher, head, ce_weights, kl_weights, chunk_tokens,
                                                      temperature, vocab)
    return total, ce_rows, kl_rows


class _WeightedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, r, targets, teacher, head, ce_weights, kl_weights, chunk_tokens, temperature, vocab):
        grad = torch.zeros_like(r)
        ce_rows = r.new_zeros(len(r), dtype=torch.float32)
        kl_rows = r.new_zeros(len(r), dtype=torch.float32)
        for start in range(0, len(r), chunk_tokens):
            s = slice(start, start + chunk_tokens)
            grad[s], ce_rows[s], kl_rows[s] = _weighted_chunk(
                head, r[s], None if targets is None else targets[s], _slice(teacher, s), ce_weights[s].float(),
                kl_weights[s].float(), temperature, vocab)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(ce_rows, kl_rows)
        total = (ce_weights.float() * ce_rows).sum() + (kl_weights.float() * kl_rows).sum()
        return total, ce_rows, kl_rows

    @staticmethod
    def backward(ctx, grad_total, _grad_ce, _grad_kl):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None, None, None, None


def _weighted_chunk(head, x, targets, teacher, ce_w, kl_w, temperature, vocab):
    """(d weighted sum / d x, CE per row, KL per row) of one chunk: the head forward, the gradient at the logits,
    one backward matmul through the head (its scale, soft-cap and bias by autograd)."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = head.logits(x)
        cut = logits if vocab is None else logits[:, :vocab]
    if isinstance(teacher, TopKTarget):
        d_logits, ce_rows, kl_rows = _topk_logit_grad(cut.detach(), targets, teacher, ce_w, kl_w, temperature)
    else:
        d_logits, ce_rows, kl_rows = _exact_logit_grad(cut.detach(), targets, teacher, ce_w, kl_w, temperature, vocab)
    grad = torch.autograd.grad(cut, x, grad_outputs=d_logits)[0]
    return grad, ce_rows, kl_rows


@torch.no_grad()
def _exact_logit_grad(z, targets, teacher: HeadTarget | None, ce_w, kl_w, temperature, vocab):
    """(gradient at the logits z [T, V], CE [T], KL [T]) of ce_w * CE(z, targets) + kl_w * KL(p || softmax(z / tau)),
    p = softmax(teacher logits / tau), written out: d CE / dz = softmax(z) - onehot(targets),
    d KL / dz = (softmax(z / tau) - p) / tau. One softmax serves both terms when tau = 1; [T, V] temporaries are
    updated in place (on a CPU these passes over 152k columns cost as much as a thin matmul)."""
    rows = torch.arange(len(z), device=z.device)
    lse = torch.logsumexp(z, dim=-1)
    zero = z.new_zeros(len(z))
    ce_rows = zero if targets is None else lse - z[rows, targets]
    ce_w = ce_w if targets is not None else torch.zeros_like(ce_w)
    kl_rows = zero
    grad = torch.sub(z, lse[:, None]).exp_()  # softmax(z)
    if teacher is None:
        grad.mul_(ce_w[:, None])
    else:
        t_logits = teacher.logits(vocab)
        t_logprobs = torch.log_softmax(t_logits if temperature == 1.0 else t_logits / temperature, dim=-1)
        p = t_logprobs.exp()
        if temperature == 1.0:
            # KL = sum p (log p - (z - lse)) = sum p (log p - z) + lse, since p sums to 1
            kl_rows = torch.sub(t_logprobs, z).mul_(p).sum(-1) + lse
            grad.mul_((ce_w + kl_w)[:, None])
        else:
            zt = z / temperature
            lse_t = torch.logsumexp(zt, dim=-1)
            kl_rows = torch.sub(t_logprobs, zt).mul_(p).sum(-1) + lse_t
            grad.mul_(ce_w[:, None]).add_(zt.sub_(lse_t[:, None]).exp_().mul_((kl_w / temperature)[:, None]))
        grad.sub_(p.mul_((kl_w / temperature)[:, None]))
    if targets is not None:
        grad.index_put_((rows, targets), -ce_w, accumulate=True)
    return grad, ce_rows, kl_rows


def _topk_logit_grad(z, targets, teacher: TopKTarget, ce_w, kl_w, temperature):
    """`_exact_logit_grad` against the cached top-k + tail (the bucket KL, `topk_tail_kl_rows`), by autograd on
    the logits alone (no head matmul in it)."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        zero = z.new_zeros(len(z))
        ce_rows = zero if targets is None else F.cross_entropy(z, targets, reduction="none")
        kl_rows = topk_tail_kl_rows(torch.log_softmax(z / temperature, dim=-1), teacher)
        weighted = (ce_w * ce_rows).sum() + (kl_w * kl_rows).sum()
        grad = torch.autograd.grad(weighted, z)[0]
    return grad, ce_rows.detach(), kl_rows.detach()
