"""`student train --stage N`: the recipe of one stage, top to bottom: set up, check, build, loop, save.

    from student.train import train_stage
    from student.config import TrainConfig
    train_stage(TrainConfig(cache="cache/", student="llava-tiny-folder", out="runs/a", stage=1, steps=200))

What a stage reads, checks, builds and computes is its declaration (student/methods.py `stage_of`); no method is
named here. The checks come before any model is loaded (cache manifest, teacher-head file, cached top-k and its
temperature, one shared tokenizer, previous stage, resume state, data source, the method's own inputs), so a
mistyped option fails in a second, not after the student loads; the checks that several methods share are the
ones in this file, each asked for by a field of the stage's declaration. The cache is opened once; its reader
serves the checks, the teacher head, the samples and the checkpoints' source identity.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.store.reader import CacheReader
from pipeline.store.teacher_head import TeacherHead, check_teacher_head, load_teacher_head
from pipeline.vlm.data import read_samples
from pipeline.vlm.models import load_vlm, pick_device
from student import distributed
from student.batches import CacheStudentData, SourceStudentData, make_loader
from student.checkpoint import (
    FINISHED_FILE,
    load_optimizer_state,
    load_resume_state,
    source_identity,
    stage_dir,
    write_json,
)
from student.config import TrainConfig
from student.loop import Training, run_loop
from student.methods import Stage, method_of, stage_of
from student.metrics_log import MetricsLog
from student.scale import enable_gradient_checkpointing, shard_student, use_bf16
from student.tokenizer_match import check_same_tokenizer, load_tokenizer
from student.trainable import trainable_student_parameters


@dataclass
class Inputs:
    """What the checks found: the run's source, ready to build from."""

    out: Path  # the stage folder
    reader: CacheReader | None  # the cache, opened once (None with --data)
    identity: str  # what the run trains on, recorded in and checked against checkpoints
    state: dict | None  # trainer state to resume from
    model: str  # the folder (or alias / hub id) the student loads from
    prepared: object = None  # what the stage's `prepare` found for its `build` (e.g. where its weights load from)


def train_stage(cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> list[dict]:
    """Run (or resume) one stage; returns the per-step metrics of this call. `stop_after` ends early (tests)."""
    rank, world = distributed.setup()  # set up: this process among the ranks (rank 0 of 1 without torchrun)
    inputs = check_inputs(cfg, resume, world)  # check: everything that needs no model
    training = build_training(cfg, inputs, rank, world)  # build: student, data, teacher head, optimizer
    metrics = _loop(training, rank, progress, stop_after)  # loop: steps, metrics and the checkpoints
    if training.step == cfg.steps and rank == 0:  # save: the last checkpoint is written; mark the stage finished
        write_json(inputs.out / FINISHED_FILE, {"step": training.step})
    return metrics


# -- check ---------------------------------------------------------------------------------------------------

def check_inputs(cfg: TrainConfig, resume: bool, world: int = 1) -> Inputs:
    """Everything that can be checked without loading a model; raises FileNotFoundError / ValueError."""
    if cfg.fsdp and world == 1:
        raise ValueError("--fsdp shards the student across processes: launch with torchrun --nproc_per_node N")
    stage = stage_of(cfg)
    out = stage_dir(cfg)
    reader = _open_cache(cfg, stage) if cfg.cache is not None else None
    if reader is None:
        read_samples(cfg.data, cfg.image_root)  # a missing or unreadable data source fails here
    identity = source_identity(cfg, reader.manifest if reader is not None else None)
    state = load_resume_state(out, cfg, identity) if resume else None
    model = str(out) if state else student_source(cfg)  # the previous stage must be finished
    if stage.shared_tokenizer and reader is not None:  # the tokenizer alone, before anything else about the student
        check_same_tokenizer(load_tokenizer(model), reader.manifest, cfg.cache, model, cfg.method)
    prepared = stage.prepare(cfg, reader, out, state is not None, model) if stage.prepare else None
    return Inputs(out, reader, identity, state, model, prepared)


def _open_cache(cfg: TrainConfig, stage: Stage) -> CacheReader:
    """The cache, opened once, and what the stage needs of it: samples, the teacher head's file, the top-k."""
    reader = CacheReader(cfg.cache, read_layers=stage.layers)  # a folder without a readable manifest fails here
    if len(reader) == 0:
        raise ValueError(f"{cfg.cache}: the cache holds no committed samples (every one rejected, or the dump "
                         f"has not committed a shard yet); see `pipeline inspect {cfg.cache} --rejects`")
    if stage.teacher_head:
        check_teacher_head(cfg.cache, reader.manifest)
    check_topk_targets(cfg, reader.manifest)
    return reader


def check_topk_targets(cfg: TrainConfig, manifest) -> None:
    """A stage whose loss reads the cached top-k (`Stage.topk`, or `topk_if_asked` with --teacher-distribution
    topk) needs a cache that holds it, and a KL against it the cache's temperature: the stored log-probs cannot be
    re-tempered (the tail is one bucket), and a student divided by another temperature would be pulled towards
    p^(T_cache / T), not the teacher's distribution."""
    stage = stage_of(cfg)
    asked = stage.topk_if_asked and cfg.loss.teacher_distribution == "topk"
    if not (asked or stage.topk):
        return
    what = f"--method {cfg.method}" + (" --teacher-distribution topk" if asked else "")
    alternative = (", or --teacher-distribution exact (the teacher head on the cached features, which any temperature "
                   "tempers on both sides)") if asked else ""
    if manifest.topk.k == 0:
        raise ValueError(f"{what} needs the cache's top-k log-probs, and {cfg.cache} was dumped with --top-k 0: dump "
                         f"it again with --top-k 16 (say){alternative}")
    cached = manifest.topk.temperature
    if stage.tempered and cfg.loss.temperature != cached:
        raise ValueError(f"{what}: the cache's top-k log-probs are at temperature {cached:g}, and a KL against them "
                         f"with --temperature {cfg.loss.temperature:g} would not pull the student towards the "
                         f"teacher's distribution: use --temperature {cached:g}{alternative}")


def student_source(cfg: TrainConfig) -> str:
    """The method's first stage starts from --student (so does any stage with --from-student or --data); a later
    one from the previous stage's folder, which must be finished."""
    if cfg.stage == method_of(cfg).first_stage or cfg.from_student or cfg.data:
        return cfg.student
    previous = stage_dir(cfg, cfg.stage - 1)
    if not (previous / FINISHED_FILE).exists():
        raise FileNotFoundError(
            f"stage {cfg.stage} reads {previous}, which is missing or unfinished: run --stage {cfg.stage - 1} first, "
            f"or pass --from-student to start stage {cfg.stage} from --student (e.g. an SFT baseline)")
    return str(previous)


# -- build ---------------------------------------------------------------------------------------------------

def build_training(cfg: TrainConfig, inputs: Inputs, rank: int, world: int) -> Training:
    """Load the student, its data, the teacher head and what trains beside it; build the optimizer; restore a
    resumed state."""
    stage = stage_of(cfg)
    device = torch.device(pick_device(cfg.device))
    bf16 = use_bf16(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    vlm = load_vlm(inputs.model, dtype="float32", device=str(device))  # fp32 weights; bf16 comes from autocast
    student = vlm.model
    _check_student_vocabulary(vlm)
    data = _student_data(cfg, inputs.reader, vlm)
    head = _teacher_head(cfg, inputs.reader, device, bf16) if stage.teacher_head and inputs.reader else None
    beside = stage.build(cfg, inputs.prepared, vlm, inputs.reader.manifest, device) if stage.build else None
    if cfg.gradient_checkpointing and cfg.stage in (2, 3):  # the stages where the student trains
        enable_gradient_checkpointing(student, beside.module if beside else None)
    if cfg.fsdp:
        shard_student(student)  # after what trains beside it copied its layers from the unsharded student
    beside_params = beside.params if beside else []
    params = trainable_student_parameters(student, cfg.stage, cfg.train_vision_encoder) + beside_params
    parts = torch.nn.ModuleDict({"student": student, **(beside.modules if beside else {})})
    optimizer, schedule, step = _optimizer(cfg, parts, params, inputs.state)
    batches = make_loader(data, cfg, first=step * cfg.grad_accum * world, rank=rank, world=world)
    student.train()
    return Training(cfg, inputs.out, vlm, beside, head, parts, optimizer, schedule, batches, step, bf16, params,
                    replicated=beside_params if cfg.fsdp else params, identity=inputs.identity, rank=rank)


def _student_data(cfg: TrainConfig, reader: CacheReader | None, vlm):
    eot, pad_id = vlm.end_of_turn, vlm.pad_id
    if reader is None:  # SFT on a data source (stage 3 only): no cache, no teacher
        data = SourceStudentData(cfg.data, vlm.processor, eot, pad_id, cfg.image_root, cfg.data_limit)
    else:
        stage = stage_of(cfg)
        data = CacheStudentData(reader, vlm.processor, eot, pad_id, cfg.image_root, cfg.sample_ids,
                                teacher=stage.teacher, layers=stage.layers)
    if len(data) == 0:
        raise ValueError(f"{cfg.cache or cfg.data}: no samples to train on (a cache whose samples were all rejected? "
                         "see `pipeline inspect`)")
    return data


def _teacher_head(cfg: TrainConfig, reader: CacheReader, device: torch.device, bf16: bool) -> TeacherHead:
    """The frozen teacher head: fp32 on CPU, bf16 on GPU under bf16 (halves a 152k x 8192 head)."""
    weight, bias = load_teacher_head(cfg.cache, reader.manifest, device=device)
    dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
    return TeacherHead(weight.to(dtype), None if bias is None else bias.to(dtype), reader.manifest.teacher.logit_scale,
                       reader.manifest.teacher.final_logit_softcapping)


def _check_student_vocabulary(vlm) -> None:
    """Every id the student's tokenizer can produce must have a row in its embedding and head."""
    rows = vlm.model.get_output_embeddings().weight.shape[0]
    size = len(vlm.tokenizer)
    if size > rows:
        raise ValueError(f"student {vlm.path}: its tokenizer has {size} tokens but its output layer only {rows} rows; "
                         "resize the embeddings (model.resize_token_embeddings) or use the matching tokenizer")


def _optimizer(cfg: TrainConfig, parts: torch.nn.ModuleDict, params: list, state: dict | None):
    """(AdamW, its linear schedule, the steps already done): restored from `state` on a resume."""
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(cfg, s))
    if not state:
        return optimizer, schedule, 0
    load_optimizer_state(parts, optimizer, state["optimizer"], cfg.fsdp)
    schedule.load_state_dict(state["scheduler"])
    return optimizer, schedule, state["step"]


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    frac = min(step / max(cfg.steps - 1, 1), 1.0)
    return (cfg.lr + (cfg.lr_end - cfg.lr) * frac) / cfg.lr


# -- loop ----------------------------------------------------------------------------------------------------

def _loop(training: Training, rank: int, progress: bool, stop_after: int | None) -> list[dict]:
    """student/loop.py's steps, logged to the stage's metrics.jsonl by rank 0."""
    cfg = training.cfg
    log = MetricsLog(training.out, tensorboard=cfg.tensorboard, resume_step=training.step,
                     wandb=cfg.to_dict() if cfg.wandb else None) if rank == 0 else None
    try:
        return run_loop(training, log, progress and rank == 0, stop_after)
    finally:
        if log is not None:
            log.close()


__all__ = ["Inputs", "build_training", "check_inputs", "student_source", "train_stage"]
