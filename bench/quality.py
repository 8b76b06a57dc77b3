"""Distillation quality on easy-VQA: GenRecal, its ablations and an SFT baseline, several seeds, two
data regimes, one teacher cache. Writes bench/results/quality.md (table + command) and a figure.

    python bench/quality.py --demo runs/demo --work runs/quality            # the full table (~35 min, 2 cores)
    python bench/quality.py --demo runs/demo --work runs/q --seeds 0 --steps 4 4 4 --test 32  # smoke

It reuses the demo's trained teacher, its cache of teacher-written answers to easy-VQA train questions
(runs/demo/cache; or, with --pool N, a new cache of N questions dumped from runs/demo/teacher/stage3)
and its untrained student (runs/demo/models/student-init), then for every seed and regime trains from
the same student init:
- sft:              stage 3 alone on the cache's answers, for stage-2 + stage-3 steps (same update count)
- genrecal:         stages 1, 2, 3 with the defaults (exact teacher distribution, regularizer on)
- genrecal-noreg:   no regularizer (Alg. 2 off)
- genrecal-klonly:  the Recalibrator's CE terms weighted 0 (KL only); the student's own CE stays
- genrecal-topk:    top-k + tail bucket teacher distributions instead of exact ones
Regimes: `full` (the whole pool) and `low` (10% of it). Nothing is tuned here: settings are fixed
up front; any choice made while building the demo was checked on held-out train questions
(`student eval --skip`), never on test. Every finished run is reused when the script is rerun.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.store.reader import CacheReader  # noqa: E402
from student.config import LossConfig  # noqa: E402

VARIANTS = {
    "sft": None,
    "genrecal": LossConfig(),
    "genrecal-noreg": LossConfig(regularizer=False),
    "genrecal-klonly": LossConfig(ce_weight=0.0),
    "genrecal-topk": LossConfig(teacher_distribution="topk"),
}
REGIMES = {"full": 1.0, "low": 0.1}


def dump_pool(demo: Path, work: Path, pool: int) -> Path:
    from pipeline.dump import dump_teacher
    from pipeline.dump_config import DumpConfig
    from pipeline.vlm.generation import GenerationSettings

    cache = work / "cache"
    dump_teacher(DumpConfig(model=str(demo / "teacher" / "stage3"), data="easy-vqa:train", out=str(cache), limit=pool,
                            responses="generate", top_k=16, question_features_fraction=0.25,
                            generation=GenerationSettings(max_new_tokens=8)), progress=True)
    return cache


def regime_ids(cache: Path, fraction: float) -> tuple[str, ...] | None:
    from pipeline.store.reader import CacheReader

    if fraction >= 1.0:
        return None
    ids = sorted(CacheReader(cache).sample_ids)
    random.Random(0).shuffle(ids)  # one fixed subset for every seed and variant
    return tuple(sorted(ids[: max(1, int(len(ids) * fraction))]))


def train_variant(variant: str, cache: Path, student: Path, out: Path, seed: int, steps: list[int], ids) -> float:
    """Train one variant from the student init; returns the wall time of its training stages."""
    from student.train import train_stage
    from student.checkpoint import FINISHED_FILE
    from student.config import TrainConfig

    common = dict(cache=str(cache), student=str(student), out=str(out), seed=seed, batch_size=16, lr=1e-3, lr_end=1e-4,
                  num_workers=1, sample_ids=ids, train_vision_encoder=True, attention_every=25)
    if VARIANTS[variant] is None:
        stages = [(3, steps[1] + steps[2], dict(from_student=True))]
    else:
        stages = [(k, n, dict(loss=VARIANTS[variant])) for k, n in zip((1, 2, 3), steps)]
    seconds = 0.0
    for stage, n, extra in stages:
        if (out / f"stage{stage}" / FINISHED_FILE).exists():
            continue
        t0 = time.perf_counter()
        train_stage(TrainConfig(stage=stage, steps=n, **common, **extra), progress=False)
        seconds += time.perf_counter() - t0
    timing = out / "train_seconds.json"
    if seconds:
        timing.write_text(json.dumps({"seconds": seconds}))
    return json.loads(timing.read_text())["seconds"]


def test_accuracy(model: Path, test: int) -> dict:
    from pipeline.vlm.evaluate import default_output, evaluate

    path = default_output(str(model), "easy-vqa:test", test)
    if path.exists():
        return json.loads(path.read_text())
    return evaluate(str(model), "easy-vqa:test", limit=test, batch_size=32, progress=False)


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["regime"], row["variant"]), []).append(row)
    table = []
    for (regime, variant), runs in groups.items():
        accs = [100 * r["accuracy"] for r in runs]
        table.append({"regime": regime, "variant": variant, "seeds": len(runs), "mean": statistics.mean(accs),
                      "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "runs": accs,
                      "train_seconds": statistics.mean(r["train_seconds"] for r in runs),
                      **{k: statistics.mean(100 * (r["per_type"].get(k, {}).get("accuracy") or 0) for r in runs)
                         for k in ("shape", "color", "yes/no")}})
    return table


def markdown(table: list[dict], teacher: dict, student_before: dict, args, command: str) -> str:
    lines = [f"easy-VQA test, first {args.test} questions; mean ± std over seeds {args.seeds}; GenRecal stage steps "
             f"{args.steps} (batch 16), SFT {args.steps[1] + args.steps[2]} steps; pool {args.pool} teacher-answered "
             "train questions (low = 10% of it).", "",
             f"Teacher (tiny Qwen2-VL, real Qwen2 tokenizer): {100 * teacher['accuracy']:.1f}%; student before "
             f"training: {100 * student_before['accuracy']:.1f}%.", "",
             "| regime | variant | seeds | accuracy (%) | shape | color | yes/no | train wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table:
        lines.append(f"| {r['regime']} | {r['variant']} | {r['seeds']} | {r['mean']:.1f} ± {r['std']:.1f} | "
                     f"{r['shape']:.1f} | {r['color']:.1f} | {r['yes/no']:.1f} | {r['train_seconds']:.0f} |")
    lines += ["", "Command:", "", f"    {command}", ""]
    return "\n".join(lines)


def figure(path: Path, table: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(VARIANTS)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.38
    for i, regime in enumerate(REGIMES):
        rows = {r["variant"]: r for r in table if r["regime"] == regime}
        xs = [j + (i - 0.5) * width for j in range(len(variants))]
        ax.bar(xs, [rows[v]["mean"] if v in rows else 0 for v in variants], width,
               yerr=[rows[v]["std"] if v in rows else 0 for v in variants], capsize=3, label=regime)
    ax.set_xticks(range(len(variants)), variants, rotation=15)
    ax.set_ylabel("easy-VQA test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(title="regime")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", type=Path, default=Path("runs/demo"), help="A finished `pipeline demo` folder.")
    parser.add_argument("--work", type=Path, default=Path("runs/quality"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, nargs=3, default=[100, 150, 100])
    parser.add_argument("--pool", type=int, default=None,
                        help="Dump a new cache of this many teacher-answered train questions (default: reuse the "
                             "demo's cache, RUN/cache).")
    parser.add_argument("--test", type=int, default=1000, help="easy-VQA test questions per evaluation.")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    cache = dump_pool(args.demo, args.work, args.pool) if args.pool else args.demo / "cache"
    args.pool = len(CacheReader(cache).sample_ids)
    student = args.demo / "models" / "student-init"
    rows = []
    for regime, fraction in REGIMES.items():
        ids = regime_ids(cache, fraction)
        for seed in args.seeds:
            for variant in args.variants:
                out = args.work / regime / variant / f"seed{seed}"
                seconds = train_variant(variant, cache, student, out, seed, args.steps, ids)
                result = test_accuracy(out / "stage3", args.test)
                rows.append({**result, "regime": regime, "variant": variant, "seed": seed, "train_seconds": seconds})
                print(f"{regime:4s} {variant:16s} seed {seed}: {100 * result['accuracy']:.1f}% ({seconds:.0f} s)",
                      flush=True)
    table = summarize(rows)
    teacher = test_accuracy(args.demo / "teacher" / "stage3", args.test)
    before = test_accuracy(student, args.test)
    text = markdown(table, teacher, before, args, command)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.work / "quality.json").write_text(json.dumps({"rows": rows, "table": table}, indent=2, default=str))
    (args.results / "quality_table.md").write_text(text)
    figure(args.results / "quality.png", table)
    print(text)


if __name__ == "__main__":
    main()
