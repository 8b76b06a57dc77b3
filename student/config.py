"""Settings of a training run: `TrainConfig` and the `LossConfig` inside it.

This module is the one place where a training setting is named, typed, defaulted and explained:
each field's docstring is its documentation, and `student train`'s options (flag, type, choices,
default and help) are generated from these fields (student/cli_options.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from student.layouts import DEFAULT_LAYOUT, layout_named
from student.methods import DEFAULT_METHOD, check_config


@dataclass(frozen=True)
class LossConfig:
    """Which terms and how they are weighted."""

    teacher_distribution: Literal["exact", "topk"] = "exact"
    """Teacher distribution of the KL terms. exact: the teacher head applied to the cached features;
    topk: the cached top-k log-probs plus one tail bucket."""
    regularizer: bool = True
    """The regularizer (Alg. 2) on the samples that have cached question features (turned off for ablations)."""
    ce_weight: float = 1.0
    """Weight of CE(teacher head(recalibrated), teacher ids), main path and regularizer (0: KL only)."""
    kl_weight: float = 1.0
    """Weight of the forward-KL terms KL(teacher || recalibrated), main path and regularizer."""
    student_ce_weight: float = 1.0
    """Stage 2: weight of the student's own CE on its answer tokens."""
    chunk_tokens: int = 1024
    """Positions per teacher-head chunk (bounds the [positions, teacher vocab] logits held at once)."""
    temperature: float = 1.0
    """Softmax temperature of the KL terms (both sides; against the cached top-k it must be the cache's, 1)."""
    uld_weight: float = 1.0
    """--method uld: weight of the ULD distance (sorted-probability L1 to the teacher's cached top-k)."""
    kd_weight: float = 1.0
    """--method kd: weight of the forward KL(teacher's cached top-k + tail || student); --method vlsi stage 2:
    weight of the last-layer KL(teacher head on the cached final features || student)."""
    verbalizer_kl_weight: float = 1.0
    """--method vlsi stage 2: weight of the layer KL, KL(teacher verbalized || student verbalized) averaged over
    the matched layer pairs."""
    layout: str = DEFAULT_LAYOUT
    """What the Recalibrator is fed at the scored positions; student/layouts.py declares each layout (where the
    lines above and the choices come from)."""

    def __post_init__(self):
        layout_named(self.layout)  # ValueError naming the layouts there are


@dataclass(frozen=True)
class TrainConfig:
    """Everything `student train` needs; the CLI fills it from its options."""

    cache: str | None
    """Teacher cache folder written by pipeline dump-teacher (not with --data)."""
    student: str
    """Student: alias, hub id or folder. Stage 1 starts from it; stages 2-3 read OUT/stage{N-1} unless
    --from-student or --data."""
    out: str
    """Run folder; stage N writes OUT/stage{N}."""
    stage: int
    """1: Recalibrator only; 2: student (but its vision encoder) + Recalibrator; 3: plain SFT of the student."""
    method: str = DEFAULT_METHOD
    """Each method, with its stages, what it reads from the cache, what it checks and its loss, is declared in
    student/methods.py (where the lines above and the choices come from)."""
    steps: int = 100
    """Optimizer steps of this stage."""
    batch_size: int = 8
    """Samples per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """Learning rate at the first step."""
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
    rec_init: Literal["copy", "random"] = "copy"
    """Recalibrator block initialisation. copy: the student's last decoder layers; random: fresh weights."""
    save_every: int = 0
    """Also checkpoint every N steps (0: only at the end)."""
    num_workers: int = 2
    """DataLoader worker processes that read the cache and run the student's processor (0: in the training process)."""
    cache_reads: Literal["block", "random"] = "block"
    """How the teacher arrays are read from the cache. block: whole shards at once, batches in shard-window order
    (shards shuffled per epoch, --shuffle-shards of them form the shuffle buffer); random: one read per sample, in a
    global shuffle (much slower per sample)."""
    shuffle_shards: int = 4
    """Block reads: shards per shuffle window (what one DataLoader worker holds in memory)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N."""
    image_root: str | None = None
    """Folder the samples' path: image references are relative to (overrides the one the cache or data source records)."""
    sample_ids: tuple[str, ...] | None = None
    """Train on these cache samples only (default: all). Library use only, no CLI option."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU; fp32; bf16 (autocast; weights and optimizer stay fp32)."""
    gradient_checkpointing: bool = False
    """Recompute student and Recalibrator layer activations in the backward pass (less memory, more compute)."""
    fsdp: bool = False
    """Shard the student with FSDP2 under torchrun (Recalibrator and teacher head replicated)."""
    max_grad_norm: float = 1.0
    """Global gradient-norm clip."""
    attention_every: int = 10
    """Log the question-reliance diagnostic (how much the Recalibrator's teacher-head CE rises when the student's
    questions are swapped within the batch; student/diagnostics.py) every N steps (0: never)."""
    data: str | None = None
    """Stage 3 only: plain SFT on this data source (what dump-teacher reads, e.g. easy-vqa:train) instead of a
    cache; starts from --student."""
    data_limit: int | None = None
    """With --data: use its first N records."""
    from_student: bool = False
    """Start this stage from --student instead of OUT/stage{N-1} (e.g. an SFT baseline: stage 3 alone)."""
    train_vision_encoder: bool = False
    """Stages 2-3: also train the student's vision encoder (for models trained from scratch; the method keeps it
    frozen). Stage 1 trains the Recalibrator only, so there it changes nothing."""
    tensorboard: bool = False
    """Also write the metrics to OUT/tensorboard/stage{N} (needs the tensorboard package)."""
    wandb: bool = False
    """Also log the metrics and these settings to Weights & Biases (needs the wandb package): project WANDB_PROJECT
    (default genrecal), run OUT's name/stage{N}, files under OUT/wandb/stage{N}; WANDB_MODE=offline needs no network."""
    student_layers: str | None = None
    """--method vlsi: the student layers that get verbalizers, comma-separated hidden_states indices (1 .. the
    student's depth - 1, increasing; e.g. 4,8,12). Default: evenly spaced over the student's depth, as many as
    the cache has teacher layers."""
    match_window: int = 2
    """--method vlsi stage 2: each student layer, in order, picks among the MATCH_WINDOW cached teacher layers right
    after the previous student layer's match (the first one: the first MATCH_WINDOW) the one of smallest KL."""
    teacher_verbalizers: str | None = None
    """--method vlsi: a teacher_verbalizers folder written by an earlier run on this cache (OUT/stage1/
    teacher_verbalizers): stage 1 loads it and trains only the student's verbalizers; stage 2 uses it instead
    of OUT/stage1's."""

    def __post_init__(self):
        if self.stage not in (1, 2, 3):
            raise ValueError(f"--stage must be 1, 2 or 3, not {self.stage}")
        if (self.cache is None) == (self.data is None):
            raise ValueError("give either a teacher cache (--cache) or, for stage 3, a data source (--data)")
        check_config(self)  # the method's own rules: its stages, its options
        if self.data is not None and self.stage != 3:
            raise ValueError("--data (SFT on a data source) is stage 3 only; stages 1-2 need a teacher cache")

    def to_dict(self) -> dict:
        return asdict(self)
