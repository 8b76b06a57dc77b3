"""Recalibrator built from real (tiny) student classes: size, init, causality, NPE, padding."""

import pytest
import torch

from pipeline.vlm.models import load_vlm
from student.recalibrator import STUDENT, TEACHER, Recalibrator, language_model

STUDENTS = [("llava-tiny", "tiny-bpe"), ("qwen2-vl-tiny", "tiny-bpe"), ("internvl-tiny", "tiny-bpe")]
D_TEACHER = 96


@pytest.fixture(scope="module", params=STUDENTS, ids=[s[0] for s in STUDENTS])
def student(request, tiny_vlm_dir):
    return load_vlm(tiny_vlm_dir(*request.param)).model


def test_parameter_count_is_blocks_plus_two_projections(student):
    rec = Recalibrator.from_student(student, D_TEACHER, depth=2)
    lm = language_model(student)
    blocks = sum(p.numel() for layer in lm.layers[-2:] for p in layer.parameters())
    d_s = lm.config.hidden_size
    assert sum(p.numel() for p in rec.parameters()) == blocks + 2 * D_TEACHER * d_s + D_TEACHER
    assert type(rec.layers[0]) is type(lm.layers[0])


def test_copy_init_equals_last_student_layers_and_random_does_not(student):
    lm = language_model(student)
    copied = Recalibrator.from_student(student, D_TEACHER, init="copy")
    random = Recalibrator.from_student(student, D_TEACHER, init="random")
    for ours, theirs in zip(copied.layers, lm.layers[-2:]):
        for (name, a), (_, b) in zip(ours.named_parameters(), theirs.named_parameters()):
            assert torch.equal(a, b.float()), name
    differs = [not torch.equal(a, b) for a, b in zip(random.layers.parameters(), copied.layers.parameters())]
    assert any(differs)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(copied.parameters(), student.parameters()))


def test_causal_positions_restart_and_padding_is_harmless(student):
    torch.manual_seed(0)
    rec = Recalibrator.from_student(student, D_TEACHER).eval()
    d_s = language_model(student).config.hidden_size
    zq, za = torch.randn(7, d_s), torch.randn(5, D_TEACHER)
    alone = rec([[(zq, STUDENT), (za, TEACHER)]])[0]
    assert alone.shape == (5, D_TEACHER)
    # batched with a longer sample (so this one is padded): same output
    other = [(torch.randn(20, d_s), STUDENT), (torch.randn(9, D_TEACHER), TEACHER)]
    batched = rec([other, [(zq, STUDENT), (za, TEACHER)]])[1]
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    # causal: changing the last answer feature leaves earlier outputs unchanged
    za2 = za.clone()
    za2[-1] += 5
    changed = rec([[(zq, STUDENT), (za2, TEACHER)]])[0]
    torch.testing.assert_close(changed[:-1], alone[:-1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(changed[-1], alone[-1])
    # the student question reaches the answer outputs through attention
    moved = rec([[(zq + 1.0, STUDENT), (za, TEACHER)]])[0]
    assert not torch.allclose(moved, alone)


def test_gradients_reach_every_recalibrator_parameter(student):
    rec = Recalibrator.from_student(student, D_TEACHER)
    d_s = language_model(student).config.hidden_size
    out = rec([[(torch.randn(4, d_s), STUDENT), (torch.randn(3, D_TEACHER), TEACHER)],
               [(torch.randn(6, D_TEACHER), TEACHER), (torch.randn(2, D_TEACHER), TEACHER)]])
    torch.cat(out).pow(2).sum().backward()
    missing = [n for n, p in rec.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert not missing, missing


def test_bad_depth_is_refused(student):
    with pytest.raises(ValueError, match="depth 99"):
        Recalibrator.from_student(student, D_TEACHER, depth=99)


@torch.no_grad()
def test_out_lengths_pick_the_last_positions(student):
    torch.manual_seed(0)
    rec = Recalibrator.from_student(student, D_TEACHER).eval()
    d_s = language_model(student).config.hidden_size
    sample = [(torch.randn(6, d_s), STUDENT), (torch.randn(3, D_TEACHER), TEACHER)]
    everything = rec([sample], [9])[0]
    assert everything.shape == (9, D_TEACHER)
    torch.testing.assert_close(rec([sample], [4])[0], everything[-4:])
    torch.testing.assert_close(rec([sample])[0], everything[-3:])  # default: the last segment


def test_gradient_checkpointing_gives_the_same_gradients(student):
    torch.manual_seed(0)
    d_s = language_model(student).config.hidden_size
    samples = [[(torch.randn(5, d_s), STUDENT), (torch.randn(3, D_TEACHER), TEACHER)],
               [(torch.randn(2, d_s), STUDENT), (torch.randn(4, D_TEACHER), TEACHER)]]
    grads = []
    for enabled in (False, True):
        rec = Recalibrator.from_student(student, D_TEACHER, depth=2, init="random", seed=1)
        rec.gradient_checkpointing = enabled
        sum(out.pow(2).sum() for out in rec(samples)).backward()
        grads.append([p.grad.clone() for p in rec.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
