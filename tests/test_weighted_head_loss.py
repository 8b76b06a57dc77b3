"""The fast head loss (student/losses.py `weighted_head_loss`: both terms' gradients in one backward head pass,
the exact teacher's logit gradient written out, shared teacher rows through the head once) against plain
autograd on the full logits: values per position and gradients, for every kind of teacher and head."""

import pytest
import torch
import torch.nn.functional as F

from pipeline.feature_pass import head_statistics
from pipeline.store.teacher_head import TeacherHead
from student.losses import HeadTarget, TopKTarget, head_losses, topk_tail_kl_rows, weighted_head_loss


def make(vocab=300, d=16, t=37, seed=0, scale=1.0, softcap=None, bias=False):
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(vocab, generator=g) if bias else None
    head = TeacherHead(torch.randn(vocab, d, generator=g), b, scale, softcap)
    r = torch.randn(t, d, generator=g, requires_grad=True)
    teacher = torch.randn(t, d, generator=g)
    targets = torch.randint(0, vocab, (t,), generator=g)
    ce_w, kl_w = torch.rand(t, generator=g), torch.rand(t, generator=g)
    return head, r, teacher, targets, ce_w, kl_w


def plain(head, r, targets, teacher, ce_w, kl_w, temperature=1.0, vocab=None):
    """(weighted sum, CE per row, KL per row) by plain autograd over the full logits: the reference."""
    logits = head.logits(r)
    if vocab is not None:
        logits = logits[:, :vocab]
    ce = F.cross_entropy(logits, targets, reduction="none") if targets is not None else logits.new_zeros(len(r))
    logprobs = torch.log_softmax(logits / temperature, -1)
    if teacher is None:
        kl = logits.new_zeros(len(r))
    elif isinstance(teacher, TopKTarget):
        kl = topk_tail_kl_rows(logprobs, teacher)
    else:
        t_logits = teacher.head.logits(teacher.features if teacher.rows is None else teacher.features[teacher.rows])
        t_logits = t_logits if vocab is None else t_logits[:, :vocab]
        t_logprobs = torch.log_softmax(t_logits / temperature, -1)
        kl = F.kl_div(logprobs, t_logprobs, log_target=True, reduction="none").sum(-1)
    return (ce_w * ce).sum() + (kl_w * kl).sum(), ce, kl


def check(head, r, targets, teacher, ce_w, kl_w, chunk_tokens=5, temperature=1.0, vocab=None):
    total, ce, kl = weighted_head_loss(head, r, targets, teacher, ce_w, kl_w, chunk_tokens, temperature, vocab)
    (grad,) = torch.autograd.grad(3.0 * total, r)  # a factor: the backward scales by the incoming gradient
    ref_teacher = HeadTarget(head, teacher) if isinstance(teacher, torch.Tensor) else teacher
    ref_total, ref_ce, ref_kl = plain(head, r, targets, ref_teacher, ce_w, kl_w, temperature, vocab)
    (ref_grad,) = torch.autograd.grad(3.0 * ref_total, r)
    torch.testing.assert_close(total, ref_total.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce, ref_ce.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, ref_kl.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert not ce.requires_grad and not kl.requires_grad


@pytest.mark.parametrize("scale, softcap, bias", [(1.0, None, False), (0.5, 2.0, True)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk_tokens", [5, 1024])
def test_exact_teacher_equals_plain_autograd(scale, softcap, bias, temperature, chunk_tokens):
    head, r, teacher, targets, ce_w, kl_w = make(scale=scale, softcap=softcap, bias=bias)
    check(head, r, targets, teacher, ce_w, kl_w, chunk_tokens, temperature)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_teacher_equals_plain_autograd(temperature):
    head, r, teacher, targets, ce_w, kl_w = make()
    stats = head_statistics(head, teacher, 8)
    topk = TopKTarget(stats["topk_ids"], stats["topk_logprobs"], stats["tail_logmass"])
    check(head, r, targets, topk, ce_w, kl_w, temperature=temperature)


def test_another_head_with_a_vocabulary_cut_and_one_term_at_a_time():
    head, r, teacher, targets, ce_w, kl_w = make(vocab=320)
    other = TeacherHead(torch.randn(310, 16, generator=torch.Generator().manual_seed(5)))
    check(head, r, targets, HeadTarget(other, teacher), ce_w, kl_w, vocab=300)
    check(head, r, None, HeadTarget(other, teacher), ce_w, kl_w, vocab=300)  # KL alone
    check(head, r, targets, None, ce_w, kl_w, vocab=300)  # CE alone


def test_shared_teacher_rows_equal_the_rows_written_out():
    """HeadTarget.rows (the regularizer's rows of a sample read the main path's features): the same losses and
    gradients as the features repeated, chunks cutting through the repeated rows."""
    head, r, teacher, targets, ce_w, kl_w = make(t=24)
    rows = torch.cat([torch.arange(12), torch.arange(12)])
    shared = HeadTarget(head, teacher[:12], rows)
    check(head, r, targets, shared, ce_w, kl_w, chunk_tokens=7)
    a = weighted_head_loss(head, r, targets, shared, ce_w, kl_w, 7)
    b = weighted_head_loss(head, r, targets, teacher[:12][rows], ce_w, kl_w, 7)
    torch.testing.assert_close(a, b)


def test_uniform_weights_give_head_losses_sum():
    """With weights 1/T the total is head_losses' CE + KL (the per-group means step.py logs), gradients too."""
    head, r, teacher, targets, _, _ = make()
    w = torch.full((len(r),), 1.0 / len(r))
    total, ce, kl = weighted_head_loss(head, r, targets, teacher, w, w, chunk_tokens=5)
    ref_ce, ref_kl = head_losses(head, r, targets, teacher, chunk_tokens=5)
    torch.testing.assert_close(total, (ref_ce + ref_kl).detach())
    torch.testing.assert_close(ce.mean(), ref_ce.detach())
    torch.testing.assert_close(kl.mean(), ref_kl.detach(), rtol=1e-4, atol=1e-6)
    g = torch.autograd.grad(total, r)[0]
    ref_g = torch.autograd.grad(ref_ce + ref_kl, r)[0]
    torch.testing.assert_close(g, ref_g, rtol=1e-4, atol=1e-7)


def test_a_bf16_head_runs_its_matmuls_in_bf16_like_the_plain_path():
    head, r, teacher, targets, ce_w, kl_w = make()
    head = TeacherHead(head.weight.bfloat16())
    total, _, _ = weighted_head_loss(head, r, targets, teacher, ce_w, kl_w)
    ref_total = plain(head, r, targets, HeadTarget(head, teacher), ce_w, kl_w)[0]
    torch.testing.assert_close(total, ref_total.detach(), rtol=1e-4, atol=1e-4)


def _items(head, n_items=3, d=16, seed=1):
    from types import SimpleNamespace

    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n_items):
        n = 4 + 3 * i
        features = torch.randn(n, d, generator=g)
        stats = head_statistics(head, features, 8)
        items.append(SimpleNamespace(teacher_features=features,
                                     teacher_targets=torch.randint(0, head.weight.shape[0], (n,), generator=g),
                                     teacher_topk=TopKTarget(stats["topk_ids"], stats["topk_logprobs"],
                                                             stats["tail_logmass"])))
    return items


@pytest.mark.parametrize("distribution", ["exact", "topk"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_step_head_terms_equal_the_plain_path_per_group(distribution, temperature):
    """student/step.py head_terms (main path and regularizer in one weighted pass, a sample's teacher rows shared)
    against what it replaced: head_losses per group, weighted by ce_weight and kl_weight; values and gradients."""
    from student.config import LossConfig
    from student.step import head_terms

    head = make()[0]
    items = _items(head)
    reg_items = [items[0], items[2]]  # the samples with question features
    g = torch.Generator().manual_seed(2)
    main = [torch.randn(len(i.teacher_features), 16, generator=g, requires_grad=True) for i in items]
    reg = [torch.randn(len(i.teacher_features), 16, generator=g, requires_grad=True) for i in reg_items]
    cfg = LossConfig(teacher_distribution=distribution, ce_weight=0.7, kl_weight=1.3, chunk_tokens=6,
                     temperature=temperature)
    total, values = head_terms(head, [(main, items), (reg, reg_items)], cfg)

    ref_total, ref_values = 0.0, []
    for outputs, group in ((main, items), (reg, reg_items)):
        teacher = (TopKTarget.cat([i.teacher_topk for i in group], "cpu") if distribution == "topk"
                   else torch.cat([i.teacher_features for i in group]))
        ce, kl = head_losses(head, torch.cat(outputs), torch.cat([i.teacher_targets for i in group]), teacher,
                             cfg.chunk_tokens, temperature)
        ref_values.append((ce.detach(), kl.detach()))
        ref_total = ref_total + cfg.ce_weight * ce + cfg.kl_weight * kl
    torch.testing.assert_close(total, ref_total.detach(), rtol=1e-5, atol=1e-6)
    for (ce, kl), (ref_ce, ref_kl) in zip(values, ref_values):
        torch.testing.assert_close(ce, ref_ce, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kl, ref_kl, rtol=1e-4, atol=1e-6)
    grads = torch.autograd.grad(total, main + reg)
    ref_grads = torch.autograd.grad(ref_total, main + reg)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
