"""bench/gpu_check.sh in its reduced --cpu mode: every row of the table, finite numbers, and a failing
check turns into a non-zero exit. (The GPU numbers themselves come from a GPU run, not from here.)"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Written out here, not imported from the script: a row the script stops producing must fail this test.
EXPECTED_ROWS = [
    "hf greedy vs reference loop", "vllm vs hf greedy", "dump tokens/s (bf16)", "dump outside-forward share",
    "dump peak memory", "stage-2 GenRecal tokens/s (bf16)", "SFT tokens/s (bf16)", "stage-2 / SFT time per token",
    "training peak memory",
]
SHARES = {"hf greedy vs reference loop", "dump outside-forward share"}


def run_check(out: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Run the script as a user would; return the process and its JSON report."""
    env = dict(os.environ)
    if (Path(sys.prefix) / "bin" / "python").exists():  # the environment running these tests, not a fresh setup
        env["GENRECAL_VENV"] = sys.prefix
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--out", str(out), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    report = out / "gpu_check.json"
    assert report.exists(), f"no {report}; stderr:\n{proc.stderr[-3000:]}"
    return proc, json.loads(report.read_text())


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    return run_check(tmp_path_factory.mktemp("gpu-check"))


def test_cpu_mode_passes_with_every_row(cpu_run):
    proc, report = cpu_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert report["passed"] is True and report["mode"] == "cpu"
    rows = {row["name"]: row for row in report["rows"]}
    assert sorted(rows) == sorted(EXPECTED_ROWS)
    for name in EXPECTED_ROWS:
        assert f"| {name} |" in proc.stdout, f"row {name!r} missing from the printed table"
        row = rows[name]
        if name == "vllm vs hf greedy" and importlib.util.find_spec("vllm") is None:
            assert row["status"] == "skipped" and row["detail"] == "vllm not installed: skipped"
            continue
        assert row["status"] == "ok", row
        assert isinstance(row["value"], (int, float)) and math.isfinite(row["value"]) and row["value"] >= 0, row
        if name in SHARES:
            assert row["value"] <= 1.0, row
        elif name != "hf greedy vs reference loop":
            assert row["value"] > 0, row
    assert rows["hf greedy vs reference loop"]["value"] == 1.0
    markdown = (Path(proc.args[proc.args.index("--out") + 1]) / "gpu_check.md").read_text()
    assert all(f"| {name} |" in markdown for name in EXPECTED_ROWS)


def test_a_failing_check_fails_the_run(tmp_path):
    proc, report = run_check(tmp_path, "--only", "greedy", "--inject-mismatch")
    assert proc.returncode != 0
    assert report["passed"] is False
    row = next(r for r in report["rows"] if r["name"] == "hf greedy vs reference loop")
    assert row["status"] == "fail" and "injected mismatch" in row["detail"], row
    assert "| hf greedy vs reference loop |" in proc.stdout and "| fail |" in proc.stdout


class _WordTokenizer:
    def encode(self, text: str, add_special_tokens: bool = False) -> list[str]:
        return text.split()


def _vllm_row(monkeypatch, vllm_answers: list[str], hf: list[str]):
    """check_vllm on a stand-in engine (vLLM itself needs a GPU): only the comparison and its verdict run."""
    import types

    import pipeline.vlm.generation as generation

    sys.path.insert(0, str(REPO / "bench"))
    import gpu_check

    class FakeVLLM:
        def __init__(self, model_path, settings):
            self.settings = settings

        def generate(self, prompts):
            return list(vllm_answers)

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if name == "vllm" else real_find_spec(name))
    monkeypatch.setattr(generation, "VLLMGenerator", FakeVLLM)
    ctx = gpu_check.Context("cuda", gpu_check.MODES["cpu"], Path("."), inject_mismatch=False,
                            models={"teacher": "teacher-folder"}, teacher_fp32=types.SimpleNamespace(tokenizer=_WordTokenizer()))
    return gpu_check.check_vllm(ctx, [("prompt", [])] * len(hf), hf)


def test_vllm_row_tolerates_a_late_near_tie_but_not_wrong_first_tokens(monkeypatch):
    hf = ["red circle", "blue square", "green triangle", "yes no"]
    late_flip = _vllm_row(monkeypatch, ["red circle", "blue square", "green triangle", "yes yes"], hf)
    assert late_flip.status == "ok" and late_flip.value == 0.75
    wrong = _vllm_row(monkeypatch, ["the the", "the the", "the the", "yes no"], hf)
    assert wrong.status == "fail" and wrong.value == 0.25
