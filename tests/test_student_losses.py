"""Chunked teacher-head losses against the plain full-vocabulary computation."""

import pytest
import torch

from pipeline.store.teacher_head import TeacherHead
from pipeline.feature_pass import head_statistics
from student.losses import TopKTarget, chunk_losses, head_losses


def setup(vocab=300, d=16, t=37, seed=0, softcap=None):
    g = torch.Generator().manual_seed(seed)
    head = TeacherHead(torch.randn(vocab, d, generator=g), None, 1.0, softcap)
    r = torch.randn(t, d, generator=g, dtype=torch.float32, requires_grad=True)
    teacher = torch.randn(t, d, generator=g)
    targets = torch.randint(0, vocab, (t,), generator=g)
    return head, r, teacher, targets


def topk_of(head, teacher, k):
    stats = head_statistics(head, teacher, k)
    return TopKTarget(stats["topk_ids"], stats["topk_logprobs"], stats["tail_logmass"])


@pytest.mark.parametrize("mode", ["exact", "topk"])
@pytest.mark.parametrize("softcap", [None, 20.0])
def test_chunked_equals_naive_values_and_gradients(mode, softcap):
    head, r, teacher_feats, targets = setup(softcap=softcap)
    teacher = teacher_feats if mode == "exact" else topk_of(head, teacher_feats, 8)
    ce, kl = head_losses(head, r, targets, teacher, chunk_tokens=5)
    (0.7 * ce + 1.3 * kl).backward()
    chunked_grad = r.grad.clone()
    r.grad = None
    ce_ref, kl_ref = chunk_losses(head, r, targets, teacher, 1.0)
    n = len(targets)
    (0.7 * ce_ref / n + 1.3 * kl_ref / n).backward()
    torch.testing.assert_close(ce, ce_ref / n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, kl_ref / n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_grad, r.grad, rtol=1e-5, atol=1e-5)


def test_naive_kl_is_the_textbook_forward_kl():
    head, r, teacher, targets = setup()
    _, kl = chunk_losses(head, r, targets, teacher, 1.0)
    p = torch.softmax(head.logits(teacher), -1)
    q = torch.softmax(head.logits(r), -1)
    torch.testing.assert_close(kl, (p * (p.log() - q.log())).sum(), rtol=1e-5, atol=1e-5)


def test_topk_tail_kl_approaches_exact_kl_as_k_grows():
    head, r, teacher, targets = setup(vocab=200, t=20, seed=3)
    exact = head_losses(head, r, targets, teacher)[1].item()
    gaps = [abs(head_losses(head, r, targets, topk_of(head, teacher, k))[1].item() - exact) for k in (1, 8, 64, 199)]
    assert gaps == sorted(gaps, reverse=True), gaps
    assert gaps[-1] < 1e-4 and gaps[0] > 10 * gaps[-1]


def test_only_one_chunk_of_logits_is_alive():
    """Every tensor autograd keeps is at most one chunk of logits; the naive path keeps [T, vocab]."""
    head, r, teacher, targets = setup(vocab=20000, d=32, t=512)

    def largest_saved(fn):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            out = fn()
        return max(sizes), out

    chunked, (ce, kl) = largest_saved(lambda: head_losses(head, r, targets, teacher, chunk_tokens=64))
    naive, _ = largest_saved(lambda: chunk_losses(head, r, targets, teacher, 1.0))
    assert chunked <= 64 * 20000 < naive == 512 * 20000
    (ce + kl).backward()
    assert r.grad.shape == r.shape


def _plain_uld(student_logits, teacher_logprobs):
    """Reference: sort both full probability vectors, zero-pad to one length, sum |difference|."""
    total = 0.0
    for s_row, t_row in zip(torch.softmax(student_logits, -1), teacher_logprobs.exp()):
        length = max(len(s_row), len(t_row))
        s = torch.zeros(length).index_copy(0, torch.arange(len(s_row)), torch.sort(s_row, descending=True).values)
        t = torch.zeros(length).index_copy(0, torch.arange(len(t_row)), torch.sort(t_row, descending=True).values)
        total = total + (s - t).abs().sum()
    return total


@pytest.mark.parametrize("student_vocab, k", [(300, 8), (5, 8)])
def test_uld_distance_equals_the_sorted_l1_by_hand(student_vocab, k):
    from student.losses import uld_distance

    g = torch.Generator().manual_seed(3)
    head, _, teacher_feats, _ = setup()
    teacher = topk_of(head, teacher_feats, k)
    # shuffle the stored order: the distance must not depend on the order the top-k come in
    perm = torch.randperm(k, generator=g)
    teacher = TopKTarget(teacher.ids[:, perm], teacher.logprobs[:, perm], teacher.tail_logmass)
    logits = torch.randn(len(teacher.ids), student_vocab, generator=g, requires_grad=True)
    got = uld_distance(logits, teacher)
    (grad,) = torch.autograd.grad(got, logits)
    plain_logits = logits.detach().clone().requires_grad_(True)
    expected = _plain_uld(plain_logits, teacher.logprobs.float())
    (plain_grad,) = torch.autograd.grad(expected, plain_logits)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, plain_grad, rtol=1e-4, atol=1e-6)
