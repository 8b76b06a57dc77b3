"""The training loop of one stage: optimizer steps, metrics, checkpoints. student/train.py sets up
what it runs on (`Training`) and calls `run_loop`.

Stage 1 trains the Recalibrator only; stage 2 the student (all but the vision encoder) and the
Recalibrator, with the regularizer and the student's own CE; stage 3 is plain SFT of the student
on the cache's answers, without Recalibrator. The other methods dispatch in `_Run._terms`: uld and kd
(student/step.py, stage 2 from --student) and vlsi stages 1-2 (student/vlsi_step.py; its stage 3 is this SFT).
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
from student.metrics_log import MetricsLog
from student.recalibrator import Recalibrator
from student.scale import autocast, clip_gradients, gradient_norm
from student.step import genrecal_losses, kd_losses, student_ce, student_forward, uld_losses
from student.vlsi_step import VLsIParts, vlsi_losses
from student.vlsi_train import verbalizer_modules

STAGE_TERMS = {
    1: ("ce", "kl", "reg_ce", "reg_kl", "total"),
    2: ("ce", "kl", "reg_ce", "reg_kl", "student_ce", "total"),
    3: ("student_ce", "total"),
}
METHOD_TERMS = {"uld": ("student_ce", "uld", "total"),  # not by stage
                "kd": ("student_ce", "kd", "paired_share", "total")}
VLSI_TERMS = {1: ("teacher_verbalizer_ce", "student_verbalizer_ce", "total"),  # stage 2 adds match_s{l} per layer
              2: ("layer_kl", "last_kl", "student_ce", "paired_share", "total")}


@dataclass
class Training:
    """Everything the loop runs on, set up by student/train.py."""

    cfg: TrainConfig
    out: Path  # the stage folder
    vlm: object  # pipeline.vlm.models.LoadedVLM of the student
    rec: Recalibrator | None
    head: TeacherHead | None
    parts: torch.nn.ModuleDict  # student (+ rec or verbalizers): what the optimizer state refers to
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    batches: object  # iterator over this rank's micro-batches from `step` on
    step: int  # optimizer steps already done (resume)
    bf16: bool
    params: list  # every trainable parameter
    replicated: list  # parameters whose gradients are averaged by hand across ranks
    identity: str  # what the run trains on (student.checkpoint.source_identity)
    rank: int = 0
    vlsi: VLsIParts | None = None  # --method vlsi stages 1-2: both sides' verbalizers


def run_loop(t: Training, log: MetricsLog | None, progress: bool, stop_after: int | None = None) -> list[dict]:
    """Optimizer steps from `t.step` to `cfg.steps` (or `stop_after` of them, tests), each logged to `log`
    (rank 0; None elsewhere), checkpointing every `save_every` steps and at the end; returns the records."""
    cfg, step = t.cfg, t.step
    run = _Run(cfg, t.vlm.model, t.rec, t.head, t.bf16, t.replicated, t.params, t.vlsi, len(t.vlm.tokenizer))
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
            save_checkpoint(cfg, t.vlm, t.rec, t.parts, t.optimizer, t.schedule, step, t.rank, t.identity,
                            verbalizer_modules(t.vlsi))
    t.step = step
    if bar is not None:
        bar.close()
    return metrics


class _Run:
    """What one optimizer step needs, fixed for the whole stage."""

    def __init__(self, cfg: TrainConfig, student, rec, head, bf16: bool, replicated: list, params: list,
                 vlsi: VLsIParts | None = None, vocab: int | None = None):
        self.cfg, self.student, self.rec, self.head, self.bf16, self.vlsi = cfg, student, rec, head, bf16, vlsi
        self.vocab = vocab  # the student tokenizer's size: kd's softmax leaves the head's padding rows out
        self.replicated, self.params = replicated, params  # gradients averaged by hand / all trainable
        student_ids = {id(p) for p in student.parameters()}  # the two parts whose gradient norms are logged
        self.parts = ([p for p in params if id(p) in student_ids], [p for p in params if id(p) not in student_ids])

    def optimizer_step(self, batches, step: int, optimizer) -> dict:
        """One optimizer step over `grad_accum` micro-batches drawn from the `batches` iterator."""
        cfg, device = self.cfg, self.student.device
        # a fixed set of terms (0 where a micro-batch has none, e.g. no question features), so that
        # accumulation and the mean over ranks agree
        totals = dict.fromkeys(_term_names(cfg), 0.0)
        measure = self.rec is not None and cfg.attention_every > 0 and step % cfg.attention_every == 0  # question reliance
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

    def _clip(self) -> dict:
        """Clip the global gradient norm; the norms before clipping, over all and per part (the student, and what
        trains beside it: the Recalibrator or VLsI's verbalizers). AdamW's steps hardly depend on a common scale
        of the gradients, so one clip over both parts does not shrink the student's steps; the per-part norms say
        how large each part's gradients are (e.g. a new Recalibrator behind a large teacher head)."""
        s_norm, b_norm = (gradient_norm(part) for part in self.parts)
        total = clip_gradients(self.params, self.cfg.max_grad_norm, norm=(s_norm**2 + b_norm**2) ** 0.5)
        return {"grad_norm": total, "grad_norm_student": s_norm, "grad_norm_beside": b_norm}

    def _terms(self, batch, measure_reliance: bool) -> dict:
        if self.cfg.method == "uld":
            return uld_losses(self.student, batch, self.cfg.loss, self.cfg.fsdp)
        if self.cfg.method == "kd":
            return kd_losses(self.student, batch, self.cfg.loss, self.cfg.fsdp, self.vocab)
        if self.vlsi is not None:
            return vlsi_losses(self.student, self.vlsi, self.head, batch, self.cfg.stage, self.cfg.loss)
        if self.cfg.stage == 3:
            _, logits = student_forward(self.student, batch, True, self.cfg.fsdp)
            loss = student_ce(logits, batch)
            return {"student_ce": loss, "total": loss}
        return genrecal_losses(self.student, self.rec, self.head, batch, self.cfg.stage, self.cfg.loss, measure_reliance,
                               self.cfg.fsdp)


def _term_names(cfg: TrainConfig) -> tuple[str, ...]:
    if cfg.method == "vlsi" and cfg.stage in VLSI_TERMS:
        return VLSI_TERMS[cfg.stage]
    return METHOD_TERMS.get(cfg.method, STAGE_TERMS[cfg.stage])


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _bar(cfg: TrainConfig, step: int, enabled: bool):
    desc = f"stage {cfg.stage}" + (f" ({cfg.method})" if cfg.method != "genrecal" else "")
    return progress_bar(cfg.steps, desc, unit="step", enabled=enabled, initial=step)


def __getattr__(name: str):
    # `from student.loop import train_stage` predates student/train.py (bench scripts still use it);
    # imported lazily because student/train.py imports this module
    if name == "train_stage":
        from student.train import train_stage

        return train_stage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["STAGE_TERMS", "Training", "run_loop"]
