"""Settings of a training run, what trains in each stage, and the checkpoint folder layout.

    OUT/stage{N}/                     stock HF folder: model safetensors, config, processor/tokenizer, chat template
    OUT/stage{N}/recalibrator/        model.safetensors + recalibrator.json (stages 1-2)
    OUT/stage{N}/trainer_state/       optimizer, scheduler position, RNG, data order (for --resume)
    OUT/stage{N}/train_config.json    the resolved configuration
    OUT/stage{N}/metrics.jsonl        one line per optimizer step
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from student.step import LossConfig

RECALIBRATOR_DIR = "recalibrator"
STATE_DIR = "trainer_state"
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
FINISHED_FILE = "trainer_state/finished.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything `student train` needs; the CLI fills it from its options."""

    cache: str | None
    """Teacher cache folder written by pipeline dump-teacher (None with `data`)."""
    student: str
    """Student for stage 1: alias, hub id or folder (stages 2-3 read OUT/stage{N-1})."""
    out: str
    """Run folder; stage N writes OUT/stage{N}."""
    stage: int
    """1: Recalibrator only; 2: student body + projector + Recalibrator; 3: plain SFT."""
    steps: int = 100
    """Optimizer steps of this stage."""
    batch_size: int = 8
    """Samples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """Learning rate at the start of the stage."""
    lr_end: float = 1e-5
    """Learning rate at the last step (linear decay)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seed of initialisation and data order."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss terms and weights."""
    rec_depth: int = 2
    """Recalibrator decoder blocks."""
    rec_init: str = "copy"
    """copy: the student's last layers; random."""
    save_every: int = 0
    """Also checkpoint every N steps (0: only at the end)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N."""
    image_root: str | None = None
    """Overrides the cache's image root for path: references."""
    sample_ids: tuple[str, ...] | None = None
    """Train on these cache samples only (default: all)."""
    precision: str = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU; fp32; bf16 (autocast; weights and optimizer stay fp32)."""
    gradient_checkpointing: bool = False
    """Recompute student and Recalibrator layer activations in the backward pass."""
    fsdp: bool = False
    """Shard the student with FSDP2 under torchrun (Recalibrator and teacher head replicated)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    attention_every: int = 10
    """Log the Recalibrator's attention share on the student question every N steps (0: never)."""
    data: str | None = None
    """Stage 3 only: SFT on this data source (what dump-teacher reads) instead of a cache; starts from `student`."""
    data_limit: int | None = None
    """With `data`: use its first N samples."""
    from_student: bool = False
    """Start this stage from `student` instead of OUT/stage{N-1} (e.g. an SFT baseline: stage 3 alone)."""
    train_vision_encoder: bool = False
    """Stages 2-3: also train the vision encoder (for models trained from scratch; the method keeps it frozen)."""
    tensorboard: bool = False
    """Also write the metrics to OUT/tensorboard/stageN (needs the tensorboard package)."""

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"--stage must be 1, 2 or 3, not {self.stage}")
        if (self.cache is None) == (self.data is None):
            raise ValueError("give either a teacher cache (--cache) or, for stage 3, a data source (--data)")
        if self.data is not None and self.stage != 3:
            raise ValueError("--data (SFT on a data source) is stage 3 only; stages 1-2 need a teacher cache")

    def to_dict(self) -> dict:
        return asdict(self)


def stage_dir(cfg: TrainConfig, stage: int | None = None) -> Path:
    return Path(cfg.out) / f"stage{cfg.stage if stage is None else stage}"


def student_source(cfg: TrainConfig) -> str:
    """Stage 1 starts from --student; later stages from the previous stage's output."""
    if cfg.stage == 1 or cfg.from_student or cfg.data:
        return cfg.student
    previous = stage_dir(cfg, cfg.stage - 1)
    if not (previous / FINISHED_FILE).exists():
        raise FileNotFoundError(f"stage {cfg.stage} reads {previous}, which is missing or unfinished: run --stage {cfg.stage - 1} first")
    return str(previous)


def is_vision_encoder(name: str) -> bool:
    """Parameters of the vision encoder (frozen in every stage); projectors/mergers are not."""
    return (".vision_tower." in f".{name}" or ".visual." in f".{name}") and "merger" not in name


def trainable_student_parameters(student, stage: int, train_vision_encoder: bool = False) -> list:
    """Stage 1: none; stages 2-3: everything but the vision encoder (unless `train_vision_encoder`)."""
    params = []
    for name, p in student.named_parameters():
        train = stage in (2, 3) and (train_vision_encoder or not is_vision_encoder(name))
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
