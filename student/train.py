"""`student train --stage N`: the recipe of one GenRecal stage: check the inputs, set up, run the
loop (student/loop.py), finish.

    from student.train import train_stage
    from student.config import TrainConfig
    train_stage(TrainConfig(cache="cache/", student="llava-tiny-folder", out="runs/a", stage=1, steps=200))

The cheap checks (cache manifest, teacher-head file, previous stage, resume state, data source) come
before any model is loaded, so a mistyped option fails in a second, not after the student loads.
The cache is opened once; its reader serves the checks, the teacher head, the samples and the
checkpoints' source identity.
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
    RECALIBRATOR_DIR,
    load_optimizer_state,
    load_recalibrator,
    load_resume_state,
    source_identity,
    stage_dir,
    student_source,
    write_json,
)
from student.config import TrainConfig
from student.loop import Training, run_loop
from student.metrics_log import MetricsLog
from student.recalibrator import Recalibrator
from student.scale import enable_gradient_checkpointing, shard_student, use_bf16
from student.trainable import trainable_student_parameters
from student.vlsi_train import (
    VerbalizerSources,
    check_same_tokenizer_first,
    check_vlsi_inputs,
    set_up_verbalizers,
    trainable_verbalizers,
    verbalizer_modules,
)


@dataclass
class Inputs:
    """What the cheap checks found: the run's source, ready to set up from."""

    out: Path  # the stage folder
    reader: CacheReader | None  # the cache, opened once (None with --data)
    identity: str  # what the run trains on, recorded in and checked against checkpoints
    state: dict | None  # trainer state to resume from
    model: str  # the folder (or alias / hub id) the student loads from
    verbalizers: VerbalizerSources | None = None  # --method vlsi stages 1-2: where the verbalizers come from


def train_stage(cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> list[dict]:
    """Run (or resume) one stage; returns the per-step metrics of this call. `stop_after` ends early (tests)."""
    rank, world = distributed.setup()
    inputs = check_inputs(cfg, resume, world)
    training = set_up(cfg, inputs, rank, world)
    log = MetricsLog(inputs.out, tensorboard=cfg.tensorboard, resume_step=training.step) if rank == 0 else None
    try:
        metrics = run_loop(training, log, progress and rank == 0, stop_after)
    finally:
        if log is not None:
            log.close()
    if training.step == cfg.steps and rank == 0:
        write_json(inputs.out / FINISHED_FILE, {"step": training.step})
    return metrics


def check_inputs(cfg: TrainConfig, resume: bool, world: int = 1) -> Inputs:
    """Everything that can be checked without loading a model; raises FileNotFoundError / ValueError."""
    if cfg.fsdp and world == 1:
        raise ValueError("--fsdp shards the student across processes: launch with torchrun --nproc_per_node N")
    out = stage_dir(cfg)
    reader = None
    if cfg.cache is not None:
        # a folder without a readable manifest fails here; only VLsI's stages 1-2 read the intermediate layers
        reader = CacheReader(cfg.cache, read_layers=cfg.method == "vlsi" and cfg.stage != 3)
        if len(reader) == 0:
            raise ValueError(f"{cfg.cache}: the cache holds no committed samples (every one rejected, or the dump "
                             f"has not committed a shard yet); see `pipeline inspect {cfg.cache} --rejects`")
        if cfg.stage != 3 and cfg.method in ("genrecal", "vlsi"):  # SFT, ULD and KD do not use the teacher head
            check_teacher_head(cfg.cache, reader.manifest)
    else:
        read_samples(cfg.data, cfg.image_root)  # a missing or unreadable data source fails here
    if reader is not None:
        check_topk_targets(cfg, reader.manifest)
    identity = source_identity(cfg, reader.manifest if reader is not None else None)
    state = load_resume_state(out, cfg, identity) if resume else None
    model = str(out) if state else student_source(cfg)  # the previous stage must be finished
    check_same_tokenizer_first(cfg, reader, model)  # kd, vlsi: before anything else about the student
    verbalizers = check_vlsi_inputs(cfg, reader, out, state is not None, model)
    return Inputs(out, reader, identity, state, model, verbalizers)


def check_topk_targets(cfg: TrainConfig, manifest) -> None:
    """A stage whose loss reads the cached top-k (uld, kd; genrecal stages 1-2 and vlsi stage 2 with
    --teacher-distribution topk) needs a cache that holds it, and a KL against it the cache's temperature: the
    stored log-probs cannot be re-tempered (the tail is one bucket), and a student divided by another
    temperature would be pulled towards p^(T_cache / T), not the teacher's distribution."""
    topk = cfg.loss.teacher_distribution == "topk" and (
        (cfg.method == "genrecal" and cfg.stage in (1, 2)) or (cfg.method == "vlsi" and cfg.stage == 2))
    if not (topk or (cfg.method in ("uld", "kd") and cfg.stage == 2)):
        return
    what = f"--method {cfg.method}" + (" --teacher-distribution topk" if topk else "")
    alternative = (", or --teacher-distribution exact (the teacher head on the cached features, which any temperature "
                   "tempers on both sides)") if topk else ""
    if manifest.topk.k == 0:
        raise ValueError(f"{what} needs the cache's top-k log-probs, and {cfg.cache} was dumped with --top-k 0: dump "
                         f"it again with --top-k 16 (say){alternative}")
    cached = manifest.topk.temperature
    if cfg.method != "uld" and cfg.loss.temperature != cached:  # ULD compares sorted probabilities, untempered
        raise ValueError(f"{what}: the cache's top-k log-probs are at temperature {cached:g}, and a KL against them "
                         f"with --temperature {cfg.loss.temperature:g} would not pull the student towards the "
                         f"teacher's distribution: use --temperature {cached:g}{alternative}")


def set_up(cfg: TrainConfig, inputs: Inputs, rank: int, world: int) -> Training:
    """Load the student, its data, the teacher head and the Recalibrator; build the optimizer; restore a resumed state."""
    device = torch.device(pick_device(cfg.device))
    bf16 = use_bf16(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    vlm = load_vlm(inputs.model, dtype="float32", device=str(device))  # fp32 weights; bf16 comes from autocast
    student = vlm.model
    _check_student_vocabulary(vlm)
    data = _student_data(cfg, inputs.reader, vlm)
    uses_head = inputs.reader is not None and cfg.stage != 3 and cfg.method in ("genrecal", "vlsi")
    head = _teacher_head(cfg, inputs.reader, device, bf16) if uses_head else None
    rec = _recalibrator(cfg, student, inputs.reader, inputs.out if inputs.state else None, device)
    vlsi = set_up_verbalizers(cfg, inputs.verbalizers, vlm, inputs.reader.manifest, device) if inputs.verbalizers else None
    if cfg.gradient_checkpointing and cfg.stage in (2, 3):
        enable_gradient_checkpointing(student, rec)
    if cfg.fsdp:
        shard_student(student)  # after the Recalibrator copied its layers from the unsharded student
    student_params = trainable_student_parameters(student, cfg.stage, cfg.train_vision_encoder)
    rec_params = list(rec.parameters()) if rec else []
    params = student_params + rec_params + trainable_verbalizers(vlsi)
    parts = torch.nn.ModuleDict({"student": student, **({"rec": rec} if rec else {}), **verbalizer_modules(vlsi)})
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(cfg, s))
    step = 0
    if inputs.state:
        load_optimizer_state(parts, optimizer, inputs.state["optimizer"], cfg.fsdp)
        schedule.load_state_dict(inputs.state["scheduler"])
        step = inputs.state["step"]
    batches = make_loader(data, cfg, first=step * cfg.grad_accum * world, rank=rank, world=world)
    student.train()
    return Training(cfg, inputs.out, vlm, rec, head, parts, optimizer, schedule, batches, step, bf16, params,
                    replicated=rec_params if cfg.fsdp else params, identity=inputs.identity, rank=rank, vlsi=vlsi)


def _student_data(cfg: TrainConfig, reader: CacheReader | None, vlm):
    eot, pad_id = vlm.end_of_turn, vlm.pad_id
    if reader is None:  # SFT on a data source (stage 3 only): no cache, no teacher
        data = SourceStudentData(cfg.data, vlm.processor, eot, pad_id, cfg.image_root, cfg.data_limit)
    else:
        data = CacheStudentData(reader, vlm.processor, eot, pad_id, cfg.image_root, cfg.sample_ids,
                                teacher=cfg.stage != 3, layers=cfg.method == "vlsi" and cfg.stage != 3)
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


def _recalibrator(cfg: TrainConfig, student, reader, resume_dir: Path | None, device) -> Recalibrator | None:
    if cfg.stage == 3 or cfg.method != "genrecal":
        return None
    d_teacher = reader.manifest.teacher.hidden_size
    rec = Recalibrator.from_student(student, d_teacher, depth=cfg.rec_depth, init=cfg.rec_init, seed=cfg.seed)
    source = resume_dir or (stage_dir(cfg, 1) if cfg.stage == 2 and not cfg.from_student else None)
    if source is not None:
        load_recalibrator(rec, source / RECALIBRATOR_DIR)
    return rec.to(device)


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    frac = min(step / max(cfg.steps - 1, 1), 1.0)
    return (cfg.lr + (cfg.lr_end - cfg.lr) * frac) / cfg.lr


__all__ = ["Inputs", "check_inputs", "set_up", "train_stage"]
