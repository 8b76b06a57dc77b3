"""Head statistics vs a plain full-softmax reference; generation backends against stand-ins."""

import importlib.util

import pytest
import torch

from pipeline.store.teacher_head import TeacherHead
from pipeline.feature_pass import head_statistics, stored_positions, wants_question_features
from pipeline.vlm.answers import answers_agree
from pipeline.vlm.generation import resolve_backend


def reference_statistics(head: TeacherHead, features: torch.Tensor, k: int) -> dict:
    logits = torch.nn.functional.linear(features.double(), head.weight.double(), None if head.bias is None else head.bias.double())
    logits = logits * head.logit_scale
    if head.softcap:
        logits = torch.tanh(logits / head.softcap) * head.softcap
    logprobs = torch.log_softmax(logits, -1)
    top = logprobs.topk(k, -1)
    tail = torch.log1p(-top.values.exp().sum(-1))
    return dict(logsumexp=torch.logsumexp(logits, -1), topk_ids=top.indices, topk_logprobs=top.values, tail_logmass=tail)


@pytest.mark.parametrize("scale, softcap, bias", [(1.0, None, False), (0.5, 30.0, True)])
def test_chunked_head_statistics_match_full_softmax(scale, softcap, bias):
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(1000, 32, generator=g) / 4
    head = TeacherHead(weight, torch.randn(1000, generator=g) if bias else None, scale, softcap)
    features = torch.randn(77, 32, generator=g) * 3
    ours = head_statistics(head, features, k=16, chunk_tokens=10)
    ref = reference_statistics(head, features, k=16)
    assert torch.equal(ours["topk_ids"], ref["topk_ids"])
    for name in ("logsumexp", "topk_logprobs", "tail_logmass"):
        torch.testing.assert_close(ours[name].double(), ref[name], rtol=1e-5, atol=1e-5)
    total = ours["topk_logprobs"].exp().sum(-1) + ours["tail_logmass"].exp()
    torch.testing.assert_close(total, torch.ones(77), rtol=1e-5, atol=1e-5)


def test_no_topk_still_gives_logsumexp():
    head = TeacherHead(torch.randn(50, 8))
    out = head_statistics(head, torch.randn(5, 8), k=0)
    assert set(out) == {"logsumexp"} and out["logsumexp"].shape == (5,)


def test_stored_positions_are_next_token_aligned():
    # prompt of 5 tokens (0..4), answer of 3 (5, 6, 7): features at 4, 5, 6 predict tokens 5, 6, 7
    assert stored_positions(5, 3) == slice(4, 7)


def test_question_feature_choice_is_the_same_in_every_process_and_near_the_fraction():
    """Workers and reruns are separate processes, each with its own string-hash seed: the choice may depend
    on the id only. Checked in two processes with other seeds, and pinned to known ids."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    chosen = [wants_question_features(f"id{i}", 0.25) for i in range(4000)]
    code = ("import json; from pipeline.feature_pass import wants_question_features as w; "
            "print(json.dumps([w(f'id{i}', 0.25) for i in range(4000)]))")
    for seed in ("1", "2"):  # at least one differs from this process's seed
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                             check=True, timeout=120)
        assert json.loads(out.stdout) == chosen, f"PYTHONHASHSEED={seed}"
    assert [i for i in range(40) if chosen[i]] == [3, 7, 12, 16, 22, 26, 32, 36]  # and in every version
    assert 0.22 < sum(chosen) / 4000 < 0.28
    assert not any(wants_question_features(f"id{i}", 0.0) for i in range(100))


@pytest.mark.parametrize(
    "generated, reference, agree",
    [
        ("The shape is a circle.", "circle", True),
        ("Yes, it does.", "yes", True),
        ("No", "yes", False),
        ("Yes or no, hard to say", "no", False),
        ("It is a rectangle", "triangle", False),
        ("dark blue", "blue", True),
        ("", "blue", False),
    ],
)
def test_answers_agree(generated, reference, agree):
    assert answers_agree(generated, reference) is agree


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed here")
def test_backend_resolution_without_vllm():
    assert resolve_backend("hf") == "hf"
    assert resolve_backend("auto") == "hf"  # no vllm and no GPU here
    with pytest.raises(ValueError, match="vllm extra"):
        resolve_backend("vllm")
