"""`student train --stage N`: the training loop of one GenRecal stage, with checkpoints and resume.

    from student.loop import train_stage
    from student.config import TrainConfig
    train_stage(TrainConfig(cache="cache/", student="llava-tiny-folder", out="runs/a", stage=1, steps=200))

Stage 1 trains the Recalibrator only; stage 2 the student (all but the vision encoder) and the
Recalibrator, with the regularizer and the student's own CE; stage 3 is plain SFT of the student
on the cache's answers, without Recalibrator. Each stage reads the previous stage's folder.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path

import torch

from pipeline.store.reader import CacheReader
from pipeline.store.teacher_head import TeacherHead, load_teacher_head
from pipeline.vlm.models import load_vlm, pick_device
from student import distributed
from student.batches import CacheStudentData, SourceStudentData, make_loader
from student.checkpoint import (
    FINISHED_FILE,
    RECALIBRATOR_DIR,
    load_optimizer_state,
    load_recalibrator,
    load_resume_state,
    save_checkpoint,
    stage_dir,
    student_source,
    write_json,
)
from student.config import TrainConfig
from student.metrics_log import MetricsLog
from student.recalibrator import Recalibrator
from student.scale import autocast, clip_gradients, enable_gradient_checkpointing, shard_student, use_bf16
from student.step import genrecal_losses, student_ce, student_forward
from student.trainable import trainable_student_parameters


STAGE_TERMS = {
    1: ("ce", "kl", "reg_ce", "reg_kl", "total"),
    2: ("ce", "kl", "reg_ce", "reg_kl", "student_ce", "total"),
    3: ("student_ce", "total"),
}


def train_stage(cfg: TrainConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> list[dict]:
    """Run (or resume) one stage; returns the per-step metrics of this call. `stop_after` ends early (tests)."""
    rank, world = distributed.setup()
    if cfg.fsdp and world == 1:
        raise ValueError("--fsdp shards the student across processes: launch with torchrun --nproc_per_node N")
    out = stage_dir(cfg)
    state = load_resume_state(out, cfg) if resume else None
    device = torch.device(pick_device(cfg.device))
    bf16 = use_bf16(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    vlm = load_vlm(out if state else student_source(cfg), device=str(device))
    student = vlm.model
    _check_student_vocabulary(vlm)
    eot, pad_id = vlm.end_of_turn, vlm.pad_id
    if cfg.data:  # SFT on a data source (stage 3 only): no cache, no teacher
        reader = head = None
        data = SourceStudentData(cfg.data, vlm.processor, eot, pad_id, cfg.image_root, cfg.data_limit)
    else:
        reader = CacheReader(cfg.cache)
        # clear error if missing or not matching the manifest; stage 3 (plain SFT) does not use it
        head = _teacher_head(cfg, reader, device, bf16) if cfg.stage != 3 else None
        data = CacheStudentData(cfg.cache, vlm.processor, eot, pad_id, cfg.image_root, cfg.sample_ids,
                                teacher=cfg.stage != 3)
    if len(data) == 0:
        raise ValueError(f"{cfg.cache or cfg.data}: no samples to train on (a cache whose samples were all rejected? "
                         "see `pipeline inspect`)")
    rec = _recalibrator(cfg, student, reader, out if state else None, device)
    if cfg.gradient_checkpointing and cfg.stage in (2, 3):
        enable_gradient_checkpointing(student, rec)
    if cfg.fsdp:
        shard_student(student)  # after the Recalibrator copied its layers from the unsharded student
    student_params = trainable_student_parameters(student, cfg.stage, cfg.train_vision_encoder)
    rec_params = list(rec.parameters()) if rec else []
    params = student_params + rec_params
    parts = torch.nn.ModuleDict({"student": student, **({"rec": rec} if rec else {})})
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(cfg, s))
    step = 0
    if state:
        load_optimizer_state(parts, optimizer, state["optimizer"], cfg.fsdp)
        schedule.load_state_dict(state["scheduler"])
        step = state["step"]
    batches = make_loader(data, cfg, first=step * cfg.grad_accum * world, rank=rank, world=world)
    student.train()
    run = _Run(cfg, student, rec, head, bf16, replicated=rec_params if cfg.fsdp else params, params=params)
    log = MetricsLog(out, tensorboard=cfg.tensorboard and rank == 0)
    metrics, bar = [], _bar(cfg, step, progress and rank == 0)
    while step < cfg.steps and (stop_after is None or len(metrics) < stop_after):
        record = run.optimizer_step(batches, step, optimizer)
        schedule.step()
        step += 1
        record["step"] = step
        metrics.append(record)
        if rank == 0:
            log.write(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['total']:.3f}")
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0) or len(metrics) == stop_after:
            save_checkpoint(cfg, vlm, rec, parts, optimizer, schedule, step, rank)
    if bar is not None:
        bar.close()
    log.close()
    if step == cfg.steps and rank == 0:
        write_json(out / FINISHED_FILE, {"step": step})
    return metrics


class _Run:
    """What one optimizer step needs, fixed for the whole stage."""

    def __init__(self, cfg: TrainConfig, student, rec, head, bf16: bool, replicated: list, params: list):
        self.cfg, self.student, self.rec, self.head, self.bf16 = cfg, student, rec, head, bf16
        self.replicated, self.params = replicated, params  # gradients averaged by hand / all trainable

    def optimizer_step(self, batches, step: int, optimizer) -> dict:
        """One optimizer step over `grad_accum` micro-batches drawn from the `batches` iterator."""
        cfg, device = self.cfg, self.student.device
        # a fixed set of terms (0 where a micro-batch has none, e.g. no question features), so that
        # accumulation and the mean over ranks agree
        totals = dict.fromkeys(STAGE_TERMS[cfg.stage], 0.0)
        measure = cfg.stage != 3 and cfg.attention_every > 0 and step % cfg.attention_every == 0
        wait, start, tokens = 0.0, time.perf_counter(), 0
        optimizer.zero_grad(set_to_none=True)
        for micro in range(cfg.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)  # time blocked here is the loader-wait share
            batch.inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            wait += time.perf_counter() - t0
            tokens += int(batch.inputs["attention_mask"].sum())
            with autocast(self.bf16, device):
                terms = self._terms(batch, measure and micro == 0)
            (terms["total"] / cfg.grad_accum).backward()
            for name, value in terms.items():
                share = 1.0 if name.startswith("question_attention") else 1.0 / cfg.grad_accum
                totals[name] = totals.get(name, 0.0) + value.item() * share
        distributed.average_gradients(self.replicated)
        grad_norm = clip_gradients(self.params, cfg.max_grad_norm)
        optimizer.step()
        elapsed = time.perf_counter() - start
        return {
            **distributed.mean_over_ranks(totals),
            "grad_norm": grad_norm,
            "lr": optimizer.param_groups[0]["lr"],
            "tokens_per_s": tokens / elapsed,
            "loader_wait_share": wait / elapsed,
            "peak_memory_mb": _peak_memory_mb(device),
        }

    def _terms(self, batch, measure_attention: bool) -> dict:
        if self.cfg.stage == 3:
            _, logits = student_forward(self.student, batch, True, self.cfg.fsdp)
            loss = student_ce(logits, batch)
            return {"student_ce": loss, "total": loss}
        return genrecal_losses(self.student, self.rec, self.head, batch, self.cfg.stage, self.cfg.loss, measure_attention,
                               self.cfg.fsdp)


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
    if cfg.stage == 3:
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


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bar(cfg: TrainConfig, step: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=step, desc=f"stage {cfg.stage}", unit="step", dynamic_ncols=True)


__all__ = ["train_stage"]
