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
from pipeline.models import body_forward, end_of_turn_ids, load_vlm, save_processor
from pipeline.reader import CacheReader
from pipeline.teacher_files import load_teacher_head
from student import distributed
from student.batches import CacheStudentData, LengthGroupedSampler
from student.recalibrator import Recalibrator
from student.recalibrator_io import load_recalibrator, save_recalibrator
from student.step import genrecal_losses, student_ce
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
    out = stage_dir(cfg)
    state = _load_state(out, cfg) if resume else None
    device = _device(cfg.device)
    torch.manual_seed(cfg.seed)
    vlm = load_vlm(out if state else student_source(cfg), device=device)
    student, tokenizer = vlm.model, vlm.tokenizer
    reader = CacheReader(cfg.cache)
    weight, bias = load_teacher_head(cfg.cache, reader.manifest, device=device)  # clear error if missing/mismatched
    head = TeacherHead(weight.float(), None if bias is None else bias.float(), reader.manifest.teacher.logit_scale,
                       reader.manifest.teacher.final_logit_softcapping)
    eot = end_of_turn_ids(tokenizer, vlm.processor.chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot[0]
    data = CacheStudentData(cfg.cache, vlm.processor, eot, pad_id, cfg.image_root, cfg.sample_ids)
    rec = _recalibrator(cfg, student, reader, out if state else None, device)
    params = trainable_student_parameters(student, cfg.stage) + (list(rec.parameters()) if rec else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(cfg, s))
    step = 0
    if state:
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["scheduler"])
        step = state["step"]
    batches = _loader(data, cfg, first=step * cfg.grad_accum * world, rank=rank, world=world)
    student.train()
    metrics, bar = [], _bar(cfg, step, progress and rank == 0)
    while step < cfg.steps and (stop_after is None or len(metrics) < stop_after):
        record = _optimizer_step(cfg, student, rec, head, data, batches, step, optimizer, params)
        schedule.step()
        step += 1
        record["step"] = step
        metrics.append(record)
        if rank == 0:
            _append_metrics(out, record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['total']:.3f}")
        if step == cfg.steps or (cfg.save_every and step % cfg.save_every == 0) or len(metrics) == stop_after:
            if rank == 0:
                _checkpoint(cfg, vlm, rec, optimizer, schedule, step, reader)
            distributed.barrier()
    if bar is not None:
        bar.close()
    if step == cfg.steps and rank == 0:
        write_json(out / FINISHED_FILE, {"step": step})
    return metrics


def _optimizer_step(cfg, student, rec, head, data, batches, step, optimizer, params) -> dict:
    """One optimizer step over `grad_accum` micro-batches drawn from the `batches` iterator."""
    # a fixed set of terms (0 where a micro-batch has none, e.g. no question features), so that
    # accumulation and the mean over ranks agree
    totals = dict.fromkeys(STAGE_TERMS[cfg.stage], 0.0)
    wait, start, tokens = 0.0, time.perf_counter(), 0
    optimizer.zero_grad(set_to_none=True)
    for micro in range(cfg.grad_accum):
        t0 = time.perf_counter()
        batch = next(batches)  # time blocked here is the loader-wait share
        batch.inputs = {k: v.to(student.device) for k, v in batch.inputs.items()}
        wait += time.perf_counter() - t0
        tokens += int(batch.inputs["attention_mask"].sum())
        if cfg.stage == 3:
            hidden = body_forward(student, **batch.inputs)
            terms = {"student_ce": student_ce(student, hidden, batch)}
            terms["total"] = terms["student_ce"]
        else:
            terms = genrecal_losses(student, rec, head, batch, cfg.stage, cfg.loss)
        (terms["total"] / cfg.grad_accum).backward()
        for name, value in terms.items():
            totals[name] += value.item() / cfg.grad_accum
    distributed.average_gradients(params)
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    elapsed = time.perf_counter() - start
    return {
        **distributed.mean_over_ranks(totals),
        "lr": optimizer.param_groups[0]["lr"],
        "tokens_per_s": tokens / elapsed,
        "loader_wait_share": wait / elapsed,
        "peak_memory_mb": _peak_memory_mb(student.device),
    }


def _recalibrator(cfg: TrainConfig, student, reader, resume_dir: Path | None, device) -> Recalibrator | None:
    if cfg.stage == 3:
        return None
    d_teacher = reader.manifest.teacher.hidden_size
    rec = Recalibrator.from_student(student, d_teacher, depth=cfg.rec_depth, init=cfg.rec_init, seed=cfg.seed)
    source = resume_dir or (stage_dir(cfg, 1) if cfg.stage == 2 else None)
    if source is not None:
        load_recalibrator(rec, source / RECALIBRATOR_DIR)
    return rec.to(device)


def _checkpoint(cfg, vlm, rec, optimizer, schedule, step, reader) -> None:
    """Write the whole stage folder under a temporary name, then swap it in (a crash keeps the old one)."""
    out = stage_dir(cfg)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vlm.model.save_pretrained(tmp)
    save_processor(vlm.processor, tmp)
    if rec is not None:
        save_recalibrator(rec, tmp / RECALIBRATOR_DIR)
    (tmp / STATE_DIR).mkdir()
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": schedule.state_dict(), "step": step,
                "cache_identity": _cache_identity(reader)}, tmp / STATE_DIR / "state.pt")
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
    identity = _cache_identity(CacheReader(cfg.cache))
    if state["cache_identity"] != identity:
        raise ValueError(
            f"--resume: {cfg.cache} is not the cache this run started with (teacher or settings differ: "
            f"{state['cache_identity']} vs {identity}); use a new --out"
        )
    return state


def _cache_identity(reader: CacheReader) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(reader.manifest.identity(), sort_keys=True).encode()).hexdigest()[:16]


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


def _append_metrics(out: Path, record: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / METRICS_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


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
