"""Per-step metrics of a stage: one JSON line per optimizer step in OUT/stageN/metrics.jsonl, and the
same scalars in TensorBoard when asked (`--tensorboard`, needs the `tensorboard` package).

    log = MetricsLog(Path("runs/a/stage2"), tensorboard=False, resume_step=0)
    log.write({"step": 1, "total": 3.2, ...}); log.close()

Lines are appended as steps finish, checkpoints come every --save-every steps: a run killed between
two checkpoints has logged steps that its resume will run again. So the log opens at the step the run
continues from and drops what was logged after it, in the file and in TensorBoard; every step is then
logged once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.run_metrics import METRICS_FILE, read_metrics

TENSORBOARD_DIR = "tensorboard"
# read_metrics is pipeline/run_metrics.py's, importable from here too
__all__ = ["MetricsLog", "drop_rows_after", "read_metrics"]


class MetricsLog:
    def __init__(self, folder: Path, tensorboard: bool = False, resume_step: int = 0):
        """`resume_step`: the step the run continues after (0 for a fresh start); later rows are dropped."""
        self.folder = Path(folder)
        drop_rows_after(self.folder / METRICS_FILE, resume_step)
        self.writer = None
        if tensorboard:
            self.writer = _tensorboard_writer(self.folder.parent / TENSORBOARD_DIR / self.folder.name,
                                              purge_step=resume_step + 1)

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


def drop_rows_after(path: Path, step: int) -> None:
    """Keep the rows of `path` up to `step`; rewritten atomically (a crash leaves the old or the new file)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    # a line cut short by the kill is dropped too
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= step]
    if len(kept) == len(lines):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def _tensorboard_writer(logdir: Path, purge_step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or pip install 'genrecal[tensorboard]')") from None
    # events of steps >= purge_step that an earlier, killed attempt wrote are hidden from TensorBoard
    return SummaryWriter(str(logdir), purge_step=purge_step)
