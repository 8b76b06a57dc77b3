"""The training loop of one stage: optimizer steps, metrics, checkpoints. student/train.py builds
what it runs on (`Training`) and calls `run_loop`.

What a step computes is the stage's declaration (student/methods.py `stage_of`): the terms it logs and its loss of
one batch, whatever the method; the loop itself only accumulates, averages, clips, steps and saves.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.progress import progress_bar
from pipeline.store.teacher_head import TeacherHead
from student import distributed
from student.checkpoint import save_checkpoint
from student.config import TrainConfig
from student.methods import Beside, StepParts, run_label, stage_of
from student.metrics_log import MetricsLog
from student.scale import autocast, clip_gradients, gradient_norm


@dataclass
class Training:
    """Everything the loop runs on, set up by student/train.py."""

    cfg: TrainConfig
    out: Path  # the stage folder
    vlm: object  # pipeline.vlm.models.LoadedVLM of the student
    beside: Beside | None  # what trains beside the student (the Recalibrator, VLsI's verbalizers), or None
    head: TeacherHead | None
    parts: torch.nn.ModuleDict  # student (+ what trains beside it): what the optimizer state refers to
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    batches: object  # iterator over this rank's micro-batches from `step` on
    step: int  # optimizer steps already done (resume)
    bf16: bool
    params: list  # every trainable parameter
    replicated: list  # parameters whose gradients are averaged by hand across ranks
    identity: str  # what the run trains on (student.checkpoint.source_identity)
    rank: int = 0


def run_loop(t: Training, log: MetricsLog | None, progress: bool, stop_after: int | None = None) -> list[dict]:
    """Optimizer steps from `t.step` to `cfg.steps` (or `stop_after` of them, tests), each logged to `log`
    (rank 0; None elsewhere), checkpointing every `save_every` steps and at the end; returns the records."""
    cfg, step = t.cfg, t.step
    beside = t.beside.module if t.beside is not None else None
    run = _Run(cfg, t.vlm.model, beside, t.head, t.bf16, t.replicated, t.params, vocab=len(t.vlm.tokenizer))
    folders = t.beside.folders if t.beside is not None else {}
    metrics, bar = [], _bar(cfg, step, progress)
    while step < cfg.steps and (stop_after is None or len(metrics) < stop_after):
        record = run.optimizer_step(t.batches, step, t.optimizer)
        t.schedule.step()
        step += 1
        record["step"] = step
        metrics.append(record)
        if log is not None:
            log.write(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['total']:.3f}")
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0) or len(metrics) == stop_after:
            save_checkpoint(cfg, t.vlm, t.parts, t.optimizer, t.schedule, step, t.rank, t.identity, folders)
    t.step = step
    if bar is not None:
        bar.close()
    return metrics


class _Run:
    """What one optimizer step needs, fixed for the whole stage."""

    def __init__(self, cfg: TrainConfig, student, beside, head, bf16: bool, replicated: list, params: list,
                 vocab: int | None = None):
        self.cfg, self.student, self.bf16 = cfg, student, bf16
        self.stage = stage_of(cfg)  # its terms and its loss
        # `beside`: what trains beside the student (Beside.module); `vocab`: the student tokenizer's size
        self.step_parts = StepParts(student, beside, head, cfg.loss, cfg.stage, cfg.fsdp, vocab)
        self.replicated, self.params = replicated, params  # gradients averaged by hand / all trainable
        student_ids = {id(p) for p in student.parameters()}  # the two parts whose gradient norms are logged
        self.parts = ([p for p in params if id(p) in student_ids], [p for p in params if id(p) not in student_ids])

    def optimizer_step(self, batches, step: int, optimizer) -> dict:
        """One optimizer step over `grad_accum` micro-batches drawn from the `batches` iterator."""
        cfg, device = self.cfg, self.student.device
        # a fixed set of terms (0 where a micro-batch has none, e.g. no question features), so that
        # accumulation and the mean over ranks agree
        totals = dict.fromkeys(self.stage.terms, 0.0)
        # GenRecal's question-reliance diagnostic, this step (the other losses leave it out)
        measure = cfg.attention_every > 0 and step % cfg.attention_every == 0
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
                share = 1.0 if name.startswith("question_") else 1.0 / cfg.grad_accum  # diagnostics: micro-batch 0 only
                totals[name] = totals.get(name, 0.0) + value.item() * share
        distributed.average_gradients(self.replicated)
        norms = self._clip()
        optimizer.step()
        elapsed = time.perf_counter() - start
        return {
            **distributed.mean_over_ranks(totals),
            **norms,
            "lr": optimizer.param_groups[0]["lr"],
            "tokens_per_s": tokens / elapsed,
            "loader_wait_share": wait / elapsed,
            "peak_memory_mb": _peak_memory_mb(device),
        }

    def _terms(self, batch, measure_reliance: bool) -> dict:
        """The stage's loss terms on one micro-batch (its declared loss, student/methods.py)."""
        return self.stage.loss(self.step_parts, batch, measure_reliance)

    def _clip(self) -> dict:
        """Clip the global gradient norm; the norms before clipping, over all and per part (the student, and what
        trains beside it: the Recalibrator or VLsI's verbalizers). AdamW's steps hardly depend on a common scale
        of the gradients, so one clip over both parts does not shrink the student's steps; the per-part norms say
        how large each part's gradients are (e.g. a new Recalibrator behind a large teacher head)."""
        s_norm, b_norm = (gradient_norm(part) for part in self.parts)
        total = clip_gradients(self.params, self.cfg.max_grad_norm, norm=(s_norm**2 + b_norm**2) ** 0.5)
        return {"grad_norm": total, "grad_norm_student": s_norm, "grad_norm_beside": b_norm}


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bar(cfg: TrainConfig, step: int, enabled: bool):
    return progress_bar(cfg.steps, run_label(cfg), unit="step", enabled=enabled, initial=step)


__all__ = ["Training", "run_loop"]
