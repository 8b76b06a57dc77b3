"""Settings of a training run: `TrainConfig` and the `LossConfig` inside it.

Each field's docstring is its documentation (and the help of its `student train` option).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class LossConfig:
    """Which terms and how they are weighted."""

    teacher_distribution: str = "exact"
    """exact: head applied to cached features; topk: cached top-k plus one tail bucket."""
    regularizer: bool = True
    """Apply Alg. 2 on samples that have cached question features."""
    ce_weight: float = 1.0
    """Weight of CE(head(r_al), gt_l) (and of the regularizer's CE)."""
    kl_weight: float = 1.0
    """Weight of KL(teacher || recalibrated) (and of the regularizer's KL)."""
    student_ce_weight: float = 1.0
    """Weight of the student's own CE (stage 2)."""
    chunk_tokens: int = 1024
    """Positions per teacher-head chunk."""
    temperature: float = 1.0
    """Softmax temperature of the KL terms."""


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
