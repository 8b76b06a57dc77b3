"""The per-step metrics of a training stage: OUT/stageN/metrics.jsonl, one JSON object per optimizer step.

The student writes the file (student/metrics_log.py); the demo's report (pipeline/demo/report.py) reads it back.
Its name and its reader live here, below both, because the pipeline never imports the student.

    read_metrics(Path("runs/a/stage2"))   # -> [{"step": 1, "total": 3.2, ...}, ...]; [] when there is none
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(folder: Path) -> list[dict]:
    path = Path(folder) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
