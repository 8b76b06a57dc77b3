"""bench/scale_bench.py's plumbing, without timing anything: its "before" head path computes what student/step.py
computes (values and gradients), the fraction rows mix the two measured cases, and the JSON has the issue's schema."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import scale_bench  # noqa: E402
import scale_report  # noqa: E402
import scale_steps  # noqa: E402
from pipeline.feature_pass import head_statistics  # noqa: E402
from pipeline.store.teacher_head import TeacherHead  # noqa: E402
from student.config import LossConfig  # noqa: E402
from student.losses import TopKTarget  # noqa: E402


def _groups(seed=0, vocab=300, d=16):
    g = torch.Generator().manual_seed(seed)
    head = TeacherHead(torch.randn(vocab, d, generator=g))
    items = []
    for n in (5, 9):
        features = torch.randn(n, d, generator=g)
        stats = head_statistics(head, features, 8)
        items.append(SimpleNamespace(teacher_features=features, teacher_targets=torch.randint(0, vocab, (n,), generator=g),
                                     teacher_topk=TopKTarget(stats["topk_ids"], stats["topk_logprobs"],
                                                             stats["tail_logmass"])))
    main = [torch.randn(len(i.teacher_features), d, generator=g, requires_grad=True) for i in items]
    reg = [torch.randn(len(items[1].teacher_features), d, generator=g, requires_grad=True)]
    return head, [(main, items), (reg, [items[1]])], main + reg


def test_the_before_path_computes_the_same_loss_as_step_py():
    import student.step as step

    for distribution in ("exact", "topk"):
        head, groups, leaves = _groups()
        cfg = LossConfig(teacher_distribution=distribution, ce_weight=0.5, kl_weight=2.0, chunk_tokens=4)
        total, values = step.head_terms(head, groups, cfg)
        with scale_steps.head_path("plain"):
            assert step.head_terms is scale_steps.plain_head_terms
            plain_total, plain_values = step.head_terms(head, groups, cfg)
        assert step.head_terms is not scale_steps.plain_head_terms  # restored
        torch.testing.assert_close(total, plain_total, rtol=1e-5, atol=1e-6)
        for a, b in zip(values, plain_values):
            torch.testing.assert_close(torch.stack(a), torch.stack(b), rtol=1e-4, atol=1e-6)
        for a, b in zip(torch.autograd.grad(total, leaves), torch.autograd.grad(plain_total, leaves)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _case(seconds, ratio, sft=10.0, peak=100.0):
    return {"seconds": seconds, "cpu_seconds": seconds, "optimizer_seconds": 1.0, "peak_mb": peak, "steps": [seconds],
            "sft_seconds": sft, "sft_steps": [sft], "paired_ratio": ratio, "paired_cpu_ratio": ratio}


def test_main_rows_mix_the_fractions_and_the_json_has_the_issue_schema():
    results = {"sft": {k: v for k, v in _case(10.0, 1.0).items() if not k.startswith(("sft_", "paired"))}}
    for label in ("kd", "uld", "vlsi-stage2", "genrecal-stage1", "genrecal-tokens-stage2", "before: genrecal-stage2",
                  "before: genrecal-stage2 q"):
        results[label] = _case(12.0, 1.2)
    results["genrecal-stage2"] = _case(11.0, 1.1, peak=100.0)
    results["genrecal-stage2 q"] = _case(15.0, 1.5, peak=150.0)
    rows = scale_bench.main_rows(results)
    by_label = {r["label"]: r for r in rows}
    mid = by_label["genrecal-stage2 (q 0.05)"]
    assert abs(mid["seconds"] - (0.95 * 11 + 0.05 * 15)) < 1e-9 and abs(mid["ratio_to_sft"] - (0.95 * 1.1 + 0.05 * 1.5)) < 1e-9
    assert by_label["genrecal-stage2 (q 0)"]["peak_mb"] == 100.0 and mid["peak_mb"] == 150.0
    report = scale_report.json_report({"command": "x"}, rows, None)
    methods = {r["method"] for r in report["rows"]}
    assert methods == set(scale_report.JSON_METHODS)
    for row in report["rows"]:
        assert {"method", "seconds_per_step", "peak_mb", "ratio_to_sft"} <= set(row)
    assert all(r["question_features_fraction"] in (0.0, 0.05, 1.0) for r in report["rows"]
               if r["method"] == "genrecal-stage2")
    assert len(report["before_weighted_head_loss"]) == 3
    assert "MISSED" in "\n".join(scale_report.main_table(rows))  # the q 1 row, 1.5x
