"""Benchmark the trainer on this CPU: GenRecal stage-2 step vs plain SFT step, loader wait, loss memory.

    . .venv/bin/activate
    python bench/train_bench.py                 # ~6 min on 2 cores
    python bench/train_bench.py --reads-only    # part 3 alone, printed (results file untouched)
    python bench/train_bench.py --s3            # stage-2 loader wait from a bucket (moto, +0/30 ms): train_bench_s3.md

1. Step time: a stage-2 GenRecal step (student forward/backward + Recalibrator + chunked teacher-head
   CE/KL + regularizer) over a plain SFT step (student CE only), same student and batch, side by side.
   Pair: tiny Qwen2-VL teacher (real Qwen2 tokenizer, 152k vocab, d=128) -> tiny LLaVA student (real
   Mistral tokenizer, d=64), easy-VQA, batch 8.
2. Loader-wait share: mean over the steps of a short stage-1 run, with 0 and 2 DataLoader workers.
3. Cache reads on the demo's stage-2 setting (demo teacher -> demo student, pipeline/demo/run.py: batch 16,
   one DataLoader worker, vision encoder trained; a 400-sample cache dumped from the untrained demo teacher
   with reference answers, top-16, a quarter with question features): loader-wait share with random reads
   (one zarr read per array per sample, global shuffle) and block reads (shard-window order, whole shards
   in memory), run after run, twice; and ms/sample of each read path, cache arrays alone and whole items.
4. Loss memory for a 152,064-token teacher vocabulary (d=1024, 2,048 positions): peak extra RSS of
   forward+backward, chunked (256 positions) vs the naive full-logits computation, each in a fresh process.
Writes bench/results/train_bench.md.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `python bench/train_bench.py` puts bench/, not the root, on sys.path (tests.s3_server)
    sys.path.insert(0, str(REPO_ROOT))
RESULTS = Path(__file__).parent / "results" / "train_bench.md"
S3_RESULTS = Path(__file__).parent / "results" / "train_bench_s3.md"


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


def step_times(cache: Path, student_dir: Path, repeats: int = 8, batch_size: int = 8) -> dict:
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
    batch = data.collate([data[i] for i in range(batch_size)])
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
    from student.train import train_stage
    from student.config import TrainConfig

    cfg = TrainConfig(cache=str(cache), student=str(student_dir), out=str(workdir / f"run{workers}"), stage=1,
                      steps=8, batch_size=8, num_workers=workers)
    metrics = train_stage(cfg, progress=False)
    return sum(m["loader_wait_share"] for m in metrics[1:]) / (len(metrics) - 1)  # first step includes worker start


def demo_pair(workdir: Path, samples: int = 400):
    """The demo's teacher and student (named tiny configs) and a cache dumped from the (untrained) teacher."""
    from pipeline.demo.run import build_named
    from pipeline.dump import dump_teacher
    from pipeline.dump_config import DumpConfig

    teacher = build_named("demo-teacher", workdir / "demo-teacher")
    student = build_named("demo-student", workdir / "demo-student")
    cache = workdir / "demo-cache"
    dump_teacher(DumpConfig(model=str(teacher), data="easy-vqa:train", out=str(cache), limit=samples, top_k=16,
                            question_features_fraction=0.25), progress=False)
    return cache, student


def with_reads(cfg, reads: str):
    """`cfg` with cache_reads set; TrainConfig may not have the field yet (student/batches.py reads it with getattr)."""
    from dataclasses import fields, replace

    if "cache_reads" in {f.name for f in fields(cfg)}:
        return replace(cfg, cache_reads=reads)
    object.__setattr__(cfg, "cache_reads", reads)  # frozen dataclass: an extra attribute until the field exists
    return cfg


def stage2_loader_wait(cache: Path, student_dir: Path, reads: str, out: Path, steps: int = 24) -> dict:
    """Loader-wait share of a demo-like stage-2 run (batch 16, one worker), first step (worker start) left out."""
    from student.config import TrainConfig
    from student.train import train_stage

    cfg = TrainConfig(cache=str(cache), student=str(student_dir), out=str(out), stage=2, steps=steps, batch_size=16,
                      num_workers=1, lr=1e-3, lr_end=1e-4, from_student=True, train_vision_encoder=True)
    metrics = train_stage(with_reads(cfg, reads), progress=False)[1:]
    return {"wait": sum(m["loader_wait_share"] for m in metrics) / len(metrics),
            "tokens_per_s": sum(m["tokens_per_s"] for m in metrics) / len(metrics)}


def read_costs(cache: Path, student_dir: Path, samples: int = 200) -> dict:
    """ms/sample of random reads (random ids) and block reads (shard-window order), fresh readers each,
    for the cache arrays alone and for whole training items (plus image, chat template, processor)."""
    import random as _random

    from pipeline.store.reader import CacheReader
    from pipeline.vlm.models import load_vlm
    from student.batches import CacheStudentData, ShardWindowSampler

    vlm = load_vlm(student_dir)
    out = {}
    probe = CacheStudentData(cache, vlm.processor, vlm.end_of_turn, vlm.pad_id)
    block_order = [i for b in ShardWindowSampler(probe.shards, probe.lengths, 16).batches() for i in b][:samples]
    random_order = _random.Random(0).sample(range(len(probe)), min(samples, len(probe)))
    for name, order, block in (("random", random_order, False), ("block", block_order, True)):
        reader = CacheReader(cache)
        ids = [probe.sample_ids[i] for i in order]
        read = reader.get_from_block if block else reader.get
        t0 = time.perf_counter()
        for sid in ids:
            read(sid)
        out[f"{name} arrays"] = (time.perf_counter() - t0) / len(ids) * 1000
        data = CacheStudentData(cache, vlm.processor, vlm.end_of_turn, vlm.pad_id)
        data.block_reads = block
        t0 = time.perf_counter()
        for i in order:
            data[i]
        out[f"{name} items"] = (time.perf_counter() - t0) / len(order) * 1000
    out["shards"], out["samples"] = len(probe.reader.shards), len(probe)
    return out


def loader_ms_per_batch(cache: Path, student_dir: Path, reads: str, out: Path, batches: int = 16) -> float:
    """ms a loader spends producing one batch of 16 (in process, nothing to hide it): what one worker must
    beat the training step by."""
    from pipeline.vlm.models import load_vlm
    from student.batches import CacheStudentData, make_loader
    from student.config import TrainConfig

    vlm = load_vlm(student_dir)
    data = CacheStudentData(cache, vlm.processor, vlm.end_of_turn, vlm.pad_id)
    cfg = TrainConfig(cache=str(cache), student=str(student_dir), out=str(out), stage=2, steps=batches + 1,
                      batch_size=16, num_workers=0)
    loader = make_loader(data, with_reads(cfg, reads), first=0)
    next(loader)  # the first batch of a block read also reads the shard: a one-off, left out
    t0 = time.perf_counter()
    for _ in range(batches):
        next(loader)
    return (time.perf_counter() - t0) / batches * 1000


def reads_rows(workdir: Path) -> list[str]:
    cache, student = demo_pair(workdir)
    costs = read_costs(cache, student)
    per_batch = {r: loader_ms_per_batch(cache, student, r, workdir / "batch-cost") for r in ("random", "block")}
    step_ms = step_times(cache, student, repeats=4, batch_size=16)["genrecal"] * 1000
    waits = {}
    for round_ in (1, 2):  # run after run, twice: the machine is shared, so the spread shows
        for reads in ("random", "block"):
            waits[reads, round_] = stage2_loader_wait(cache, student, reads, workdir / f"s2-{reads}-{round_}")
    w = {r: [waits[r, k]["wait"] for k in (1, 2)] for r in ("random", "block")}
    tps = {r: sum(waits[r, k]["tokens_per_s"] for k in (1, 2)) / 2 for r in ("random", "block")}
    return [
        f"| demo stage 2 ({costs['samples']} samples, {costs['shards']} shard(s), batch 16, 1 worker): loader-wait share, "
        f"random reads (runs 1, 2) | {w['random'][0]:.3f}, {w['random'][1]:.3f} |",
        f"| same, block reads (runs 1, 2) | {w['block'][0]:.3f}, {w['block'][1]:.3f} |",
        f"| same, tokens/s random / block reads | {tps['random']:.0f} / {tps['block']:.0f} |",
        f"| cache arrays of one sample, random read (`get`) / block read (`get_from_block`) | "
        f"{costs['random arrays']:.2f} / {costs['block arrays']:.3f} ms |",
        f"| whole training item (arrays + image + student processor), random / block read | "
        f"{costs['random items']:.2f} / {costs['block items']:.2f} ms |",
        f"| one batch of 16 from make_loader in process, random / block reads | "
        f"{per_batch['random']:.0f} / {per_batch['block']:.0f} ms |",
        f"| demo stage-2 step compute, batch 16 (what one worker must keep ahead of) | {step_ms:.0f} ms |",
    ]


@contextmanager
def s3_server_process(latency_s: float):
    """moto's S3 server on 127.0.0.1 in a process of its own (in this one it would share the trainer's GIL),
    sleeping `latency_s` before every request; yields its endpoint."""
    proc = subprocess.Popen([sys.executable, str(REPO_ROOT / "tests" / "s3_server.py"), str(latency_s)],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        yield proc.stdout.readline().strip()
    finally:
        proc.kill()
        proc.wait()


def s3_cache(workdir: Path, samples: int = 400):
    """The demo pair's cache cut into about ten shards (so that a stage-2 run reads shards as it goes)."""
    from pipeline.demo.run import build_named
    from pipeline.dump import dump_teacher
    from pipeline.dump_config import DumpConfig

    teacher = build_named("demo-teacher", workdir / "demo-teacher")
    student = build_named("demo-student", workdir / "demo-student")
    cache = workdir / "s3-cache"
    dump_teacher(DumpConfig(model=str(teacher), data="easy-vqa:train", out=str(cache), limit=samples, top_k=16,
                            question_features_fraction=0.25, shard_target_tokens=160), progress=False)
    return cache, student


def s3_rows(workdir: Path) -> list[str]:
    """Loader-wait share of the demo stage 2 (batch 16, one worker, block reads) from a folder and from a bucket
    on moto with 0 and 30 ms added per request; and one whole-shard read and one random sample read there."""
    from pipeline.store.copy_cache import copy_cache
    from pipeline.store.reader import CacheReader
    from tests.s3_server import client_env, create_bucket

    cache, student = s3_cache(workdir)
    shards = len(CacheReader(cache).shards)
    rows = []
    for where, latency in (("folder", None), ("moto", 0.0), ("moto + 30 ms", 0.03)):
        location = str(cache)
        with s3_server_process(latency or 0.0) as endpoint:
            if latency is not None:
                os.environ.update(client_env(endpoint))
                bucket = f"bench-{int(latency * 1000)}ms"
                create_bucket(endpoint, bucket)
                location = f"s3://{bucket}/cache"
                copy_cache(cache, location)
            reader = CacheReader(location)
            t0 = time.perf_counter()
            reader.shard_block(reader.shards[len(reader.shards) // 2])
            shard_ms = (time.perf_counter() - t0) * 1000
            t0 = time.perf_counter()
            reader.get(reader.sample_ids[-1])
            sample_ms = (time.perf_counter() - t0) * 1000
            runs = [stage2_loader_wait(location, student, "block", workdir / f"s3-{where}-{k}") for k in (1, 2)]
        waits = ", ".join(f"{r['wait']:.3f}" for r in runs)
        rows.append(f"| {where} | {waits} | {sum(r['tokens_per_s'] for r in runs) / 2:.0f} | {shard_ms:.0f} | "
                    f"{sample_ms:.1f} |")
    return [f"Demo stage 2, {shards} shards of the 400-sample cache, batch 16, 1 DataLoader worker (prefetch 4), "
            "block reads, 24 steps (the first, with the worker's start, left out); two runs each.", "",
            "| cache | loader-wait share (runs 1, 2) | tokens/s | one whole-shard read ms | one random sample ms |",
            "|---|---|---|---|---|", *rows]


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--s3":
        lines = ["# Training from a bucket: loader wait with request latency (CPU, 2 cores)", "",
                 f"Command: `python bench/train_bench.py --s3`; torch {torch.__version__}, moto S3 server on 127.0.0.1 "
                 "in its own process (latency slept before each request).", "",
                 *s3_rows(Path(tempfile.mkdtemp(prefix="train-bench-s3-")))]
        S3_RESULTS.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    if argv and argv[0] == "--loss-memory":
        print(json.dumps({"mib": loss_memory(argv[1])}))
        return
    if argv and argv[0] == "--reads-only":
        print("\n".join(["| measure | value |", "|---|---|", *reads_rows(Path(tempfile.mkdtemp(prefix="reads-")))]))
        return
    memory = {}
    for mode in ("chunked", "naive"):
        out = subprocess.run([sys.executable, __file__, "--loss-memory", mode], capture_output=True, text=True, check=True)
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])["mib"]
    workdir = Path(tempfile.mkdtemp(prefix="train-bench-"))
    cache, student = pair(workdir)
    times = step_times(cache, student)
    waits = {w: loader_wait(cache, student, w, workdir) for w in (0, 2)}
    reads = reads_rows(workdir)
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
        f"| loader-wait share, stage 1, 0 workers (block reads, the default) | {waits[0]:.2f} |",
        f"| same, 2 workers | {waits[2]:.2f} |",
        *reads,
        f"| loss peak extra memory, 152k vocab, 2048 pos, d=1024, chunked (256 positions) | {memory['chunked']:.0f} MiB |",
        f"| same, naive full logits | {memory['naive']:.0f} MiB |",
        f"| ratio naive / chunked | {memory['naive'] / max(memory['chunked'], 1):.1f} |",
    ]
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
