"""Per-step metrics of a stage: one JSON line per optimizer step in OUT/stageN/metrics.jsonl, and the
same scalars, every one of them, in TensorBoard (`--tensorboard`, needs the `tensorboard` package) and in
Weights & Biases (`--wandb`, needs `wandb`) when asked. This is the one place metrics go out.

    log = MetricsLog(Path("runs/a/stage2"), tensorboard=False, resume_step=0, wandb=cfg.to_dict())
    log.write({"step": 1, "total": 3.2, ...}); log.close()

Lines are appended as steps finish, checkpoints come every --save-every steps: a run killed between
two checkpoints has logged steps that its resume will run again. So the log opens at the step the run
continues from and drops what was logged after it, in the file and in TensorBoard; every step is then
logged once. W&B cannot drop steps: a resume continues the same W&B run (its id is kept in
OUT/wandb/stageN/run_id), which keeps the first value of a step logged twice; a resumed stage computes the
same values as the uninterrupted one (tests/test_student_train.py), so the two agree.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.run_metrics import METRICS_FILE, read_metrics

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_RUN_ID = "run_id"
# read_metrics is pipeline/run_metrics.py's, importable from here too
__all__ = ["MetricsLog", "drop_rows_after", "read_metrics"]


class MetricsLog:
    def __init__(self, folder: Path, tensorboard: bool = False, resume_step: int = 0, wandb: dict | None = None):
        """`resume_step`: the step the run continues after (0 for a fresh start); later rows are dropped.
        `wandb`: the run's settings, recorded as the W&B run's config (None: no W&B)."""
        self.folder = Path(folder)
        drop_rows_after(self.folder / METRICS_FILE, resume_step)
        self.writer = None
        if tensorboard:
            self.writer = _tensorboard_writer(self.folder.parent / TENSORBOARD_DIR / self.folder.name,
                                              purge_step=resume_step + 1)
        self.wandb = _wandb_run(self.folder, wandb, resume_step) if wandb is not None else None

    def write(self, record: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / METRICS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = {name: value for name, value in record.items()
                   if name != "step" and isinstance(value, (int, float))}
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


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


def _wandb_run(stage: Path, config: dict, resume_step: int):
    """The W&B run of a stage: project WANDB_PROJECT (default genrecal), named OUT/stageN by the run folder's name,
    grouped by it, its files under OUT/wandb/stageN (beside, not inside, the stage folder a checkpoint replaces).
    WANDB_MODE=offline writes it there without a network (`wandb sync` uploads it later)."""
    try:
        import wandb
    except ImportError:
        raise ValueError("--wandb needs the wandb package: pip install wandb (or pip install 'genrecal[wandb]')"
                         ) from None
    root = stage.parent / WANDB_DIR / stage.name
    root.mkdir(parents=True, exist_ok=True)
    id_file = root / WANDB_RUN_ID
    # a fresh start is a new W&B run; a resume continues the one the stage started
    run_id = id_file.read_text().strip() if resume_step and id_file.exists() else os.urandom(4).hex()
    id_file.write_text(run_id + "\n")
    return wandb.init(project=os.environ.get("WANDB_PROJECT", "genrecal"), dir=str(root), id=run_id, resume="allow",
                      name=f"{stage.parent.name}/{stage.name}", group=stage.parent.name, config=config)
