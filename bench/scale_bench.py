"""Cost at real sizes: one training step of every method side by side, and the dump at a real width.

    nice -n 10 .venv/bin/python bench/scale_bench.py                  # CPU, fp32: the tables in bench/results/
    python bench/scale_bench.py --device cuda --precision bf16        # GPU (bench/gpu_check.sh runs it)
    python bench/scale_bench.py --layers 2 --scaling-layers 2 --steps 1 --no-dump --out /tmp/x   # a quick try

Student: Qwen2-VL with Qwen2-0.5B's text side (hidden 896, 24 layers, 14 heads, 2 KV heads, vocab 151,936) and a
small real vision tower (2 blocks, 448 x 448 pixels -> 256 image tokens); teacher: the 7B class's head (152,064 x
3,584) and the 72B class's (152,064 x 8,192, bf16); one sample of 1,024 prompt tokens (image tokens included)
and 128 answer tokens, batch 1, a 2-block Recalibrator (bench/scale_setup.py builds them with the project's own
code: pipeline/vlm/tiny.py's builder, load_vlm, the student's processor and chat template, the dump's
head_statistics for the top-k). Each step is the loss the trainer calls (student/methods.py), backward, clip and
AdamW (bench/scale_steps.py). Random weights: cost does not depend on them.

Tables: (1) every method at the main shapes, with GenRecal's regularizer at question-feature fractions 0, 0.05
and 1 (a sample carries question features or not: the 0.05 row is 0.95 x the step without + 0.05 x the step
with) and the head path as it was before `weighted_head_loss` ("before" rows, same run); (2) answer length and
teacher vocabulary varied, at `--scaling-layers` student layers (the extra seconds over SFT do not depend on the
student's depth; the ratio column scales the 24-layer SFT step by the token count, an estimate); (3) the dump at
the 7B class's width (bench/dump_bench.py `real_width`). Profiles of the stage-2 rows over the 1.3x target.
Writes bench/results/scale_bench.md and scale_bench.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts, also when imported

import torch  # noqa: E402

from scale_setup import Shapes, build_student  # noqa: E402
from scale_steps import Case, StepRunner  # noqa: E402

RESULTS = Path(__file__).parent / "results"
STAGE2_TARGET = 1.3
FRACTIONS = (0.0, 0.05, 1.0)
BF16_72B = dict(teacher="72b", head_dtype=torch.bfloat16)


def genrecal(label: str, stage: int, question: bool = False, **kw) -> Case:
    return Case(label, "genrecal", stage, question, **kw)


def main_cases(with_72b: bool) -> list[Case]:
    cases = [Case("sft", "genrecal", 3), Case("kd", "kd", 2), Case("uld", "uld", 2),
             genrecal("genrecal-stage1", 1), genrecal("genrecal-stage2", 2), genrecal("genrecal-stage2 q", 2, True),
             genrecal("genrecal-tokens-stage2", 2, layout="teacher-tokens"), Case("vlsi-stage2", "vlsi", 2),
             genrecal("before: genrecal-stage2", 2, head_path="plain"),
             genrecal("before: genrecal-stage2 q", 2, True, head_path="plain")]
    if with_72b:
        cases += [genrecal("72b genrecal-stage1", 1, shapes=BF16_72B), genrecal("72b genrecal-stage2", 2, shapes=BF16_72B),
                  genrecal("72b genrecal-stage2 q", 2, True, shapes=BF16_72B)]
    return cases


def scaling_cases() -> list[Case]:
    cases = []
    for answer in (32, 128, 512):
        s = dict(answer_tokens=answer)
        cases += [Case(f"sft a{answer}", "genrecal", 3, shapes=s), Case(f"kd a{answer}", "kd", 2, shapes=s),
                  Case(f"uld a{answer}", "uld", 2, shapes=s), Case(f"vlsi-stage2 a{answer}", "vlsi", 2, shapes=s),
                  genrecal(f"genrecal-stage2 a{answer}", 2, shapes=s),
                  genrecal(f"genrecal-stage2 q a{answer}", 2, True, shapes=s)]
    for vocab in (32000, 256000):
        s = dict(teacher_vocab=vocab)
        cases += [genrecal(f"genrecal-stage2 v{vocab}", 2, shapes=s), genrecal(f"genrecal-stage2 q v{vocab}", 2, True, shapes=s)]
    return cases


def run_cases(runner: StepRunner, cases: list[Case]) -> dict[str, dict]:
    results = {}
    for case in cases:
        start = time.perf_counter()
        results[case.label] = runner.run(case)
        r = results[case.label]
        print(f"{case.label}: {r['seconds']:.2f} s/step (CPU {r['cpu_seconds']:.2f} s, optimizer "
              f"{r['optimizer_seconds']:.2f} s), peak {r['peak_mb']:.0f} MiB; {time.perf_counter() - start:.0f} s "
              f"for the case; load {os.getloadavg()[0]:.1f}", flush=True)
    return results


def mixed(results: dict, without: str, with_q: str, fraction: float) -> dict:
    """The mean step at a question-feature fraction: (1 - f) x the step without question features + f x with."""
    a, b = results[without], results[with_q]
    keys = ("seconds", "cpu_seconds", "optimizer_seconds", "sft_seconds", "paired_ratio", "paired_cpu_ratio")
    out = {k: (1 - fraction) * a[k] + fraction * b[k] for k in keys}
    out["peak_mb"] = a["peak_mb"] if fraction == 0 else max(a["peak_mb"], b["peak_mb"])
    return out


def main_rows(results: dict) -> list[dict]:
    """The main table: SFT, GenRecal (stage 2 at each question-feature fraction), the tokens layout, kd, uld, vlsi;
    then the before rows (the head path as it was) and the 72B-class rows."""
    rows = [dict(label="sft", method="sft", **results["sft"], paired_ratio=1.0, paired_cpu_ratio=1.0)]

    def add(label: str, method: str, result: dict | None, **extra) -> None:
        if result is not None:  # a case left out (--cases) has no row
            rows.append(dict(label=label, method=method, **extra, **result))

    def stage2(prefix: str, teacher: str, **extra) -> None:
        if f"{prefix}genrecal-stage2" not in results or f"{prefix}genrecal-stage2 q" not in results:
            return
        for f in FRACTIONS:
            add(f"{prefix}genrecal-stage2 (q {f:g})", "genrecal-stage2",
                mixed(results, f"{prefix}genrecal-stage2", f"{prefix}genrecal-stage2 q", f), teacher=teacher,
                question_features_fraction=f, **extra)

    add("genrecal-stage1", "genrecal-stage1", results.get("genrecal-stage1"), teacher="7b", question_features_fraction=0.0)
    stage2("", "7b")
    add("genrecal-tokens-stage2", "genrecal-tokens-stage2", results.get("genrecal-tokens-stage2"), teacher="7b",
        question_features_fraction=0.0)
    for method in ("kd", "uld", "vlsi-stage2"):
        add(method, method, results.get(method))
    stage2("before: ", "7b", head_path="plain")
    add("72b genrecal-stage1", "genrecal-stage1", results.get("72b genrecal-stage1"), teacher="72b",
        question_features_fraction=0.0)
    stage2("72b ", "72b")
    for row in rows:  # each case's steps alternate with SFT steps: the ratio of neighbouring steps
        row["ratio_to_sft"], row["cpu_ratio_to_sft"] = row.pop("paired_ratio"), row.pop("paired_cpu_ratio")
    return rows


def scaling_rows(results: dict, sft_full: float | None, base: Shapes) -> list[dict]:
    rows = []
    for answer in (32, 128, 512):
        rows.append(_scaling_row("sft", answer, 152064, results[f"sft a{answer}"], None))
        full = None if sft_full is None else sft_full * (base.prompt_tokens + answer) / (base.prompt_tokens + 128)
        for name, label in (("kd", "kd"), ("uld", "uld"), ("vlsi-stage2", "vlsi-stage2"),
                            ("genrecal-stage2 (q 0)", "genrecal-stage2"), ("genrecal-stage2 (q 1)", "genrecal-stage2 q")):
            rows.append(_scaling_row(name, answer, 152064, results[f"{label} a{answer}"], full))
    for vocab in (32000, 256000):
        for name, label in (("genrecal-stage2 (q 0)", "genrecal-stage2"), ("genrecal-stage2 (q 1)", "genrecal-stage2 q")):
            rows.append(_scaling_row(name, 128, vocab, results[f"{label} v{vocab}"], sft_full))
    return rows


def _scaling_row(name: str, answer: int, vocab: int, r: dict, sft_full: float | None) -> dict:
    """A scaling row; `extra_seconds`: the step minus the SFT step paired with it (0 for SFT itself)."""
    extra = r["seconds"] - r.get("sft_seconds", r["seconds"])
    return {"method": name, "answer_tokens": answer, "teacher_vocab": vocab, "seconds": r["seconds"],
            "extra_seconds": extra, "peak_mb": r["peak_mb"], "ratio_at_depth": r.get("paired_ratio", 1.0),
            "cpu_ratio_at_depth": r.get("paired_cpu_ratio", 1.0),
            "ratio_full_depth_estimate": None if sft_full is None else (sft_full + extra) / sft_full}


def profiles(runner: StepRunner, rows: list[dict], cases: dict[str, Case]) -> dict[str, str]:
    """torch.profiler tables of the current stage-2 rows over the target (one step each)."""
    out = {}
    for row in rows:
        if row["method"] == "genrecal-stage2" and row.get("teacher") == "7b" and "head_path" not in row \
                and row["ratio_to_sft"] > STAGE2_TARGET and row["question_features_fraction"] in (0.0, 1.0):
            label = "genrecal-stage2" + (" q" if row["question_features_fraction"] else "")
            print(f"profiling {label}", flush=True)
            out[row["label"]] = runner.profile(cases[label])
    return out


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--layers", type=int, default=24, help="student decoder layers of the main table")
    parser.add_argument("--scaling-layers", type=int, default=6, help="student layers of the scaling table (0: skip)")
    parser.add_argument("--steps", type=int, default=3, help="measured steps per case (after --warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--no-72b", action="store_true", help="leave out the 72B-class rows")
    parser.add_argument("--cases", help="comma-separated labels: run only these main cases (sft always runs)")
    parser.add_argument("--no-dump", action="store_true", help="leave out the dump table")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--dump-layers", type=int, default=2, help="teacher decoder layers of the dump table")
    parser.add_argument("--dump-samples", type=int, default=8)
    parser.add_argument("--work", type=Path, default=Path("/tmp/scale-bench"), help="built models (reused)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    from scale_report import write_report

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, bf16 = torch.device(args.device), args.precision == "bf16"
    args.work.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()[0]
    # the trainer's head: fp32, but bf16 on a GPU under bf16 (student/train.py _teacher_head)
    head_dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
    base = Shapes(student_layers=args.layers, head_dtype=head_dtype)
    vlm = build_student(args.work, base, args.device)
    runner = StepRunner(vlm, base, device, bf16, args.steps, args.warmup)
    cases = main_cases(not args.no_72b)
    if args.cases:
        keep = {"sft", *args.cases.split(",")}
        cases = [case for case in cases if case.label in keep]
    results = run_cases(runner, cases)
    rows = main_rows(results)
    profile_tables = {} if args.no_profile else profiles(runner, rows, {c.label: c for c in cases})
    del runner, vlm
    scaling = []
    if args.scaling_layers:
        small = Shapes(student_layers=args.scaling_layers, head_dtype=head_dtype)
        runner = StepRunner(build_student(args.work, small, args.device), small, device, bf16, max(args.steps - 1, 1),
                            args.warmup)
        scaling = scaling_rows(run_cases(runner, scaling_cases()), rows[0]["seconds"] if args.layers == 24 else None,
                               base)
        del runner
    dump = None
    if not args.no_dump:
        from dump_bench import real_width

        dump = real_width(args.work, layers=args.dump_layers, samples=args.dump_samples, device=args.device)
    header = dict(command="python bench/scale_bench.py " + shlex.join(argv), machine=machine(device),
                  load_start=load, load_end=os.getloadavg()[0], minutes=(time.perf_counter() - started) / 60,
                  layers=args.layers, scaling_layers=args.scaling_layers, steps=args.steps, warmup=args.warmup,
                  precision=args.precision, commit=commit())
    write_report(args.out, header, rows, scaling, dump, profile_tables)


def machine(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "no GPU"
    return (f"{gpu}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main(sys.argv[1:])
