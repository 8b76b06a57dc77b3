"""`pipeline demo --quick`: every real command in order, a table, a figure, and a rerun that reuses it all."""

import json
import os
import subprocess
import sys

from PIL import Image

from tests.conftest import REPO


def test_quick_demo_runs_end_to_end_and_a_rerun_reuses_every_step(tmp_path):
    run = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "pipeline.cli", "demo", "--quick", "--out", str(run)]
    first = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert first.returncode == 0, first.stderr[-3000:]
    for model in ("teacher", "base-student", "student-sft", "student-genrecal", "student-uld"):
        assert f"| {model} |" in first.stdout
    results = json.loads((run / "results.json").read_text())
    assert [row["model"] for row in results["rows"]] == ["teacher", "base-student", "student-sft", "student-genrecal",
                                                         "student-uld"]
    assert all(0.0 <= row["accuracy"] <= 1.0 and row["samples"] == 32 for row in results["rows"])
    with Image.open(run / "demo.png") as figure:
        assert figure.format == "PNG" and figure.width > 1000
    # the student is another family with another tokenizer and a smaller hidden size
    teacher = json.loads((run / "teacher" / "stage3" / "config.json").read_text())
    student = json.loads((run / "genrecal" / "stage3" / "config.json").read_text())
    assert teacher["model_type"] == "qwen2_vl" and student["model_type"] == "llava"
    assert student["text_config"]["hidden_size"] < teacher["text_config"]["hidden_size"]
    assert student["text_config"]["vocab_size"] != teacher["text_config"]["vocab_size"]
    assert (run / "cache" / "responses").is_dir()  # teacher-written answers
    second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "[run ]" not in second.stdout and second.stdout.count("[done]") == first.stdout.count("[ok  ]")
