"""SFT step time: stage 3 on a data source (`--data`, SourceStudentData) vs stage 3 on a cache
(CacheStudentData), same student, batch, samples and answers, side by side, per DataLoader worker count.

    python bench/sft_step_bench.py [--repeats 2] [--steps 16]      # ~6 min on 2 cores

Pair: the demo's student (`pipeline build-tiny demo-student`); the cache is dumped from the demo
teacher's init with the data set's own answers (`--responses dataset`), so both sources hold the same
256 easy-VQA train questions and answers. Step time: median wall time between two logged steps
(the first two steps left out: worker start-up), and the training process's CPU seconds per step
(with 0 workers that is all the work of a step, data included; it is far less sensitive than wall time
to other load on a shared machine). Runs alternate, repeats keep the fastest median, so that other load
inflates both sides alike. Writes bench/results/sft_step_bench.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "sft_step_bench.md"
SAMPLES, BATCH, WORKERS = 256, 16, (0, 1, 2)


def build(work: Path) -> tuple[Path, Path]:
    from pipeline.demo.run import build_named
    from pipeline.dump import dump_teacher
    from pipeline.dump_config import DumpConfig

    teacher, student, cache = work / "teacher", work / "student", work / "cache"
    build_named("demo-teacher", teacher)
    build_named("demo-student", student)
    dump_teacher(DumpConfig(model=str(teacher), data="easy-vqa:train", out=str(cache), limit=SAMPLES,
                            question_features_fraction=0.0), progress=False)
    return student, cache


def median_step(student: Path, cache: Path, source: str, workers: int, steps: int, out: Path) -> tuple[float, float, float]:
    """(median wall seconds per step, median CPU seconds per step of this process, mean loader-wait share)
    of one stage-3 run."""
    from student.config import TrainConfig
    from student.metrics_log import MetricsLog
    from student.train import train_stage

    common = dict(student=str(student), out=str(out), stage=3, steps=steps, batch_size=BATCH, lr=1e-3, lr_end=1e-4,
                  num_workers=workers, train_vision_encoder=True, from_student=True)
    if source == "cache":
        cfg = TrainConfig(cache=str(cache), **common)
    else:
        cfg = TrainConfig(cache=None, data="easy-vqa:train", data_limit=SAMPLES, **common)
    shutil.rmtree(out, ignore_errors=True)
    stamps, write = [], MetricsLog.write

    def stamped(self, record):
        stamps.append((time.perf_counter(), time.process_time()))
        write(self, record)

    MetricsLog.write = stamped
    try:
        metrics = train_stage(cfg, progress=False)
    finally:
        MetricsLog.write = write
    wall = [b[0] - a[0] for a, b in zip(stamps, stamps[1:])][2:]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:])][2:]
    return statistics.median(wall), statistics.median(cpu), statistics.mean(m["loader_wait_share"] for m in metrics[3:])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args(argv)
    import torch

    work = Path(tempfile.mkdtemp(prefix="sft-step-bench-"))
    student, cache = build(work)
    best: dict[tuple[str, int], tuple[float, float, float]] = {}
    load = os.getloadavg()[0]
    for _ in range(args.repeats):
        for workers in WORKERS:
            for source in ("cache", "data"):
                step, cpu, wait = median_step(student, cache, source, workers, args.steps, work / "run")
                print(f"{source} workers={workers}: {step:.3f} s/step, {cpu:.3f} CPU s/step, loader wait {wait:.2f}",
                      flush=True)
                if (source, workers) not in best or step < best[source, workers][0]:
                    best[source, workers] = (step, cpu, wait)
    lines = [
        "# SFT step: data source vs cache (CPU)",
        "",
        f"Command: `python bench/sft_step_bench.py --repeats {args.repeats} --steps {args.steps}`; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; demo student, batch {BATCH}, stage 3, "
        f"{SAMPLES} easy-VQA train samples with their own answers on both sides. Load average at the start "
        f"{load:.1f}, at the end {os.getloadavg()[0]:.1f} (on {os.cpu_count()} cores: wall times are only "
        "comparable within a row when the machine is shared).",
        "",
        "| DataLoader workers | cache: wall s/step | data source: wall s/step | data / cache (wall) "
        "| cache: CPU s/step | data source: CPU s/step | data / cache (CPU) | loader wait, cache | loader wait, data |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for w in WORKERS:
        (c, cc, cw), (d, dc, dw) = best["cache", w], best["data", w]
        lines.append(f"| {w} | {c:.3f} | {d:.3f} | {d / c:.2f} | {cc:.3f} | {dc:.3f} | {dc / cc:.2f} | {cw:.2f} | {dw:.2f} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main(sys.argv[1:])
