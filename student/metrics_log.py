"""Per-step metrics of a stage: one JSON line per optimizer step in OUT/stageN/metrics.jsonl, and the
same scalars in TensorBoard when asked (`--tensorboard`, needs the `tensorboard` package).

    log = MetricsLog(Path("runs/a/stage2"), tensorboard=False)
    log.write({"step": 1, "total": 3.2, ...}); log.close()
"""

from __future__ import annotations

import json
from pathlib import Path

from student.checkpoint import METRICS_FILE

TENSORBOARD_DIR = "tensorboard"


class MetricsLog:
    def __init__(self, folder: Path, tensorboard: bool = False, stage: int | None = None):
        self.folder, self.stage = folder, stage
        self.writer = _tensorboard_writer(folder.parent / TENSORBOARD_DIR / folder.name) if tensorboard else None

    def write(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(name, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(folder: Path) -> list[dict]:
    path = Path(folder) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _tensorboard_writer(logdir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'genrecal[tensorboard]')") from None
    return SummaryWriter(str(logdir))
