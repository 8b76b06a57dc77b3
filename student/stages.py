"""`student train --stage N`: the training loop of one GenRecal stage, with checkpoints and resume.

    from student.stages import train_stage
    from student.train_setup import TrainConfig
    train_stage(TrainConfig(cache="cache/", student="llava-tiny-folder", out="runs/a", stage=1, steps=200))

Stage 1 trains the Recalibrator only; stage 2 the student (all but the vision encoder) and the
Recalibrator, with the regularizer and the student's own CE; stage 3 is plain SFT of the student
on the cache's answers, without Recalibrator. Each stage reads the previous stage's folder.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import time
from pathlib import Path

import torch

from pipeline.features import TeacherHead
from pipeline.models import end_of_turn_ids, load_vlm, save_processor
from pipeline.reader import CacheReader
from pipeline.teacher_files import load_teacher_head
from student import distributed
from student.batches import CacheStudentData, LengthGroupedSampler, SourceStudentData
from student.metrics_log import MetricsLog
from student.recalibrator import Recalibrator
from student.recalibrator_io import load_recalibrator, save_recalibrator
from student.scale import (
    autocast,
    clip_gradients,
    enable_gradient_checkpointing,
    full_student_state,
    load_optimizer_state,
    optimizer_state,
    shard_student,
    use_bf16,
)
from student.step import genrecal_losses, student_ce, student_forward
from student.train_setup import (
    CONFIG_FILE,
    FINISHED_FILE,
    METRICS_FILE,
    RECALIBRATOR_DIR,
    STATE_DIR,
    TrainConfig,
    stage_dir,
    student_source,
    trainable_student_parameters,
    write_json,
)


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
    state = _load_state(out, cfg) if resume else None
    device = torch.device(_device(cfg.device))
    bf16 = use_bf16(cfg.precision, device)
    torch.manual_seed(cfg.seed)
    vlm = load_vlm(out if state else student_source(cfg), device=str(device))
    student, tokenizer = vlm.model, vlm.tokenizer
    _check_student_vocabulary(vlm)
    eot = end_of_turn_ids(tokenizer, vlm.processor.chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot[0]
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
    batches = _loader(data, cfg, first=step * cfg.grad_accum * world, rank=rank, world=world)
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
            _checkpoint(cfg, vlm, rec, parts, optimizer, schedule, step, rank)
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


def _checkpoint(cfg, vlm, rec, parts, optimizer, schedule, step, rank: int) -> None:
    """Write the whole stage folder under a temporary name, then swap it in (a crash keeps the old one).
    Every rank takes part (an FSDP student is gathered); rank 0 writes."""
    model_state = full_student_state(vlm.model, cfg.fsdp)
    optim_state = optimizer_state(parts, optimizer, cfg.fsdp)
    if rank == 0:
        _write_checkpoint(cfg, vlm, rec, model_state, optim_state, schedule, step)
    distributed.barrier()


def _write_checkpoint(cfg, vlm, rec, model_state, optim_state, schedule, step) -> None:
    out = stage_dir(cfg)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vlm.model.save_pretrained(tmp, state_dict=model_state)
    save_processor(vlm.processor, tmp)
    if rec is not None:
        save_recalibrator(rec, tmp / RECALIBRATOR_DIR)
    (tmp / STATE_DIR).mkdir()
    torch.save({"optimizer": optim_state, "scheduler": schedule.state_dict(), "step": step,
                "cache_identity": _source_identity(cfg), "fsdp": cfg.fsdp}, tmp / STATE_DIR / "state.pt")
    write_json(tmp / CONFIG_FILE, cfg.to_dict())
    if (out / METRICS_FILE).exists():
        shutil.copy2(out / METRICS_FILE, tmp / METRICS_FILE)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _load_state(out: Path, cfg: TrainConfig) -> dict | None:
    path = out / STATE_DIR / "state.pt"
    if not path.exists():
        return None
    state = torch.load(path, weights_only=True)  # never unpickle arbitrary objects
    identity = _source_identity(cfg)
    if state.get("fsdp", False) != cfg.fsdp:
        raise ValueError(f"--resume: {out} was trained {'with' if state.get('fsdp') else 'without'} --fsdp; "
                         "resume it the same way")
    if state["cache_identity"] != identity:
        raise ValueError(
            f"--resume: {cfg.cache} is not the cache this run started with (teacher or settings differ: "
            f"{state['cache_identity']} vs {identity}); use a new --out"
        )
    return state


def _source_identity(cfg: TrainConfig) -> str:
    """What the run trains on: the cache's teacher and settings, or the data source and its limit."""
    import hashlib

    what = {"data": cfg.data, "limit": cfg.data_limit} if cfg.data else CacheReader(cfg.cache).manifest.identity()
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def _loader(data: CacheStudentData, cfg: TrainConfig, first: int, rank: int = 0, world: int = 1):
    """Iterator over this rank's micro-batches from global micro-batch `first` on (a resumed run skips
    what was done; rank r of W takes every W-th). With num_workers > 0, worker processes read the cache
    and run the student's processor."""
    order = _batch_order(data, cfg, world)[first:][rank::world]
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=order, collate_fn=data.collate, num_workers=cfg.num_workers,
        prefetch_factor=4 if cfg.num_workers else None,
    )
    return iter(loader)


def _batch_order(data: CacheStudentData, cfg: TrainConfig, world: int = 1) -> list[list[int]]:
    """Enough length-grouped batches for the whole stage on all ranks, epoch after epoch, fixed by the seed."""
    sampler = LengthGroupedSampler(data.lengths, cfg.batch_size, seed=cfg.seed)
    order, needed = [], cfg.steps * cfg.grad_accum * world
    while len(order) < needed:
        order += sampler.batches()
        sampler.epoch += 1
    return order


def _lr_factor(cfg: TrainConfig, step: int) -> float:
    frac = min(step / max(cfg.steps - 1, 1), 1.0)
    return (cfg.lr + (cfg.lr_end - cfg.lr) * frac) / cfg.lr


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _device(name: str) -> str:
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _bar(cfg: TrainConfig, step: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=cfg.steps, initial=step, desc=f"stage {cfg.stage}", unit="step", dynamic_ncols=True)


__all__ = ["train_stage"]
