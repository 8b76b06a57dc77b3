"""Benchmark the trainer on this CPU: GenRecal stage-2 step vs plain SFT step, loader wait, loss memory.

    . .venv/bin/activate
    python bench/train_bench.py            # ~3 min on 2 cores

1. Step time: a stage-2 GenRecal step (student forward/backward + Recalibrator + chunked teacher-head
   CE/KL + regularizer) over a plain SFT step (student CE only), same student and batch, side by side.
   Pair: tiny Qwen2-VL teacher (real Qwen2 tokenizer, 152k vocab, d=128) -> tiny LLaVA student (real
   Mistral tokenizer, d=64), easy-VQA, batch 8.
2. Loader-wait share: mean over the steps of a short stage-1 run, with 0 and 2 DataLoader workers.
3. Loss memory for a 152,064-token teacher vocabulary (d=1024, 2,048 positions): peak extra RSS of
   forward+backward, chunked (256 positions) vs the naive full-logits computation, each in a fresh process.
Writes bench/results/train_bench.md.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "train_bench.md"


def loss_memory(mode: str) -> float:
    """Peak extra MiB of one loss forward+backward (run in this process; call it in a fresh one)."""
    from pipeline.store.teacher_head import TeacherHead
    from student.losses import chunk_losses, head_losses

    g = torch.Generator().manual_seed(0)
    head = TeacherHead(torch.randn(152064, 1024, generator=g) * 0.02)
    r = torch.randn(2048, 1024, generator=g, requires_grad=True)
    teacher = torch.randn(2048, 1024, generator=g)
    targets = torch.randint(0, 152064, (2048,), generator=g)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "chunked":
        ce, kl = head_losses(head, r, targets, teacher, chunk_tokens=256)
    else:
        ce, kl = chunk_losses(head, r, targets, teacher, 1.0)
    (ce + kl).backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def pair(workdir: Path):
    from pipeline.dump import dump_teacher
    from pipeline.dump_config import DumpConfig
    from pipeline.vlm.tiny import build_tiny_vlm

    teacher = build_tiny_vlm("qwen2-vl-tiny", workdir / "teacher", tokenizer="qwen2")
    student = build_tiny_vlm("llava-tiny", workdir / "student", tokenizer="mistral", hidden_size=64, intermediate_size=256)
    dump_teacher(DumpConfig(model=str(teacher), data="easy-vqa:train", out=str(workdir / "cache"), limit=64,
                            question_features_fraction=0.25), progress=False)
    return workdir / "cache", student


def step_times(cache: Path, student_dir: Path, repeats: int = 8) -> dict:
    from pipeline.store.teacher_head import TeacherHead
    from pipeline.vlm.models import end_of_turn_ids, load_vlm
    from pipeline.store.teacher_head import load_teacher_head
    from student.batches import CacheStudentData
    from student.recalibrator import Recalibrator
    from student.config import LossConfig
    from student.step import genrecal_losses, student_ce, student_forward

    vlm = load_vlm(student_dir)
    data = CacheStudentData(cache, vlm.processor, end_of_turn_ids(vlm.tokenizer, vlm.processor.chat_template),
                            vlm.tokenizer.pad_token_id)
    batch = data.collate([data[i] for i in range(8)])
    weight, _ = load_teacher_head(cache, data.reader.manifest)
    head = TeacherHead(weight.float())
    rec = Recalibrator.from_student(vlm.model, data.reader.manifest.teacher.hidden_size)

    def genrecal():
        genrecal_losses(vlm.model, rec, head, batch, 2, LossConfig())["total"].backward()

    def sft():
        student_ce(student_forward(vlm.model, batch, with_logits=True)[1], batch).backward()

    out = {}
    for name, fn in (("genrecal", genrecal), ("sft", sft), ("genrecal ", genrecal), ("sft ", sft)):
        fn()  # warm-up
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        out.setdefault(name.strip(), []).append((time.perf_counter() - t0) / repeats)
    return {k: min(v) for k, v in out.items()}


def loader_wait(cache: Path, student_dir: Path, workers: int, workdir: Path) -> float:
    from student.loop import train_stage
    from student.config import TrainConfig

    cfg = TrainConfig(cache=str(cache), student=str(student_dir), out=str(workdir / f"run{workers}"), stage=1,
                      steps=8, batch_size=8, num_workers=workers)
    metrics = train_stage(cfg, progress=False)
    return sum(m["loader_wait_share"] for m in metrics[1:]) / (len(metrics) - 1)  # first step includes worker start


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--loss-memory":
        print(json.dumps({"mib": loss_memory(argv[1])}))
        return
    memory = {}
    for mode in ("chunked", "naive"):
        out = subprocess.run([sys.executable, __file__, "--loss-memory", mode], capture_output=True, text=True, check=True)
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])["mib"]
    workdir = Path(tempfile.mkdtemp(prefix="train-bench-"))
    cache, student = pair(workdir)
    times = step_times(cache, student)
    waits = {w: loader_wait(cache, student, w, workdir) for w in (0, 2)}
    lines = [
        "# Trainer benchmark (CPU, 2 cores)",
        "",
        f"Command: `python bench/train_bench.py`; torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "| measure | value |",
        "|---|---|",
        f"| stage-2 GenRecal step (batch 8) | {times['genrecal'] * 1000:.0f} ms |",
        f"| plain SFT step, same student and batch | {times['sft'] * 1000:.0f} ms |",
        f"| ratio GenRecal / SFT | {times['genrecal'] / times['sft']:.2f} |",
        f"| loader-wait share, stage 1, 0 workers | {waits[0]:.2f} |",
        f"| loader-wait share, stage 1, 2 workers | {waits[2]:.2f} |",
        f"| loss peak extra memory, 152k vocab, 2048 pos, d=1024, chunked (256 positions) | {memory['chunked']:.0f} MiB |",
        f"| same, naive full logits | {memory['naive']:.0f} MiB |",
        f"| ratio naive / chunked | {memory['naive'] / max(memory['chunked'], 1):.1f} |",
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
