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


def hand_logits(head, x):
    """The head by hand in float64: x W^T (+ b), times the logit scale, then cap * tanh(logits / cap)."""
    logits = x.double() @ head.weight.double().T
    if head.bias is not None:
        logits = logits + head.bias.double()
    logits = logits * head.logit_scale
    if head.softcap:
        logits = head.softcap * torch.tanh(logits / head.softcap)
    return logits


def hand_topk(head, teacher_feats, k):
    """A TopKTarget from the full teacher softmax: the k most likely ids, their log-probs, log(1 - their mass)."""
    p = torch.softmax(hand_logits(head, teacher_feats), -1)
    top = p.topk(k, -1)
    return TopKTarget(top.indices, top.values.log().float(), torch.log1p(-top.values.sum(-1)).float())


def hand_losses(head, r, targets, teacher_feats, k=None):
    """(CE sum, KL sum) from full softmaxes in float64. With k, the KL is over k+1 buckets: the teacher's
    top-k ids and one bucket holding every other id, bucket probabilities summed from the full softmax."""
    log_q = torch.log_softmax(hand_logits(head, r), -1)
    ce = -log_q.gather(1, targets[:, None]).sum()
    p = torch.softmax(hand_logits(head, teacher_feats), -1)
    if k is None:
        return ce, (p * (p.log() - log_q)).sum()
    ids = p.topk(k, -1).indices
    q = log_q.exp()
    p_b = torch.cat([p.gather(1, ids), 1 - p.gather(1, ids).sum(-1, keepdim=True)], 1)
    q_b = torch.cat([q.gather(1, ids), 1 - q.gather(1, ids).sum(-1, keepdim=True)], 1)
    return ce, (p_b * (p_b.log() - q_b.log())).sum()


@pytest.mark.parametrize("mode", ["exact", "topk"])
@pytest.mark.parametrize("scale, softcap, bias", [(1.0, None, False), (0.5, 2.0, True)])
def test_chunked_equals_naive_values_and_gradients(mode, scale, softcap, bias):
    """The chunked losses against full float64 softmaxes written out here (the head, soft-cap and
    top-k + tail buckets by hand), values and gradients."""
    head, r, teacher_feats, targets = setup()
    if bias or scale != 1.0 or softcap:
        g = torch.Generator().manual_seed(5)
        head = TeacherHead(head.weight, torch.randn(len(head.weight), generator=g) if bias else None, scale, softcap)
    k = 8 if mode == "topk" else None
    teacher = teacher_feats if mode == "exact" else hand_topk(head, teacher_feats, k)
    ce, kl = head_losses(head, r, targets, teacher, chunk_tokens=5)
    (0.7 * ce + 1.3 * kl).backward()
    chunked_grad = r.grad.clone()
    r.grad = None
    ce_ref, kl_ref = hand_losses(head, r, targets, teacher_feats, k)
    n = len(targets)
    (0.7 * ce_ref / n + 1.3 * kl_ref / n).backward()
    torch.testing.assert_close(ce.double(), ce_ref.detach() / n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl.double(), kl_ref.detach() / n, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked_grad.double(), r.grad.double(), rtol=1e-4, atol=1e-6)
    if softcap:  # the cap binds: logits beyond it exist before capping, so skipping the cap changes the losses
        assert (head.weight @ r.detach().T * scale).abs().max() > 2 * softcap


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
