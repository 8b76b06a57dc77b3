"""`pipeline demo`: the whole product on a built-in default, by running the real commands in order.

    pipeline demo                      # full run into runs/demo (about 15 min on 2 CPU cores)
    pipeline demo --quick              # a few minutes, tiny settings (what CI runs)
    pipeline demo --out runs/x         # another folder; a rerun reuses every finished step

No pretrained VLM can be downloaded here, so the demo trains its own teacher: a tiny Qwen2-VL (real
Qwen2 tokenizer, 152k vocabulary), its vision encoder pretrained on image labels (`pipeline
pretrain-vision`), then fitted with SFT on easy-VQA train. It then dumps the teacher with teacher-written
answers, distils a tiny LLaVA/Llama student (real Mistral tokenizer, 32k vocabulary, half the hidden
size) with GenRecal stages 1-3, trains SFT and ULD baselines on the same cache for as many student
updates as stages 2 + 3, evaluates teacher, base student (the init all three start from), and the three
students on easy-VQA test, prints one table and writes RUN/demo.png and RUN/results.json.

Every step is one `pipeline` / `student` command, printed before it runs; its success is recorded in
RUN/steps/<step>.json with the command, so a rerun skips finished steps (and refuses a folder that
was made with other settings).
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.demo.report import collect_results, format_table, read_curves, write_figure
from pipeline.store.fsutil import write_atomic

# Named tiny configurations (pipeline/vlm/tiny.py families): the teacher is twice the student's width.
DEMO_TEACHER = {"family": "qwen2-vl-tiny", "tokenizer": "qwen2", "hidden_size": 128, "num_hidden_layers": 4,
                "intermediate_size": 512, "image_size": 112, "tie_word_embeddings": True}
DEMO_STUDENT = {"family": "llava-tiny", "tokenizer": "mistral", "hidden_size": 64, "num_hidden_layers": 4,
                "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "image_size": 56,
                "vision_config": {"patch_size": 14}}
TINY_CONFIGS = {"demo-teacher": DEMO_TEACHER, "demo-student": DEMO_STUDENT}


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of one demo run."""

    teacher_samples: int = 20000
    """easy-VQA train questions the teacher is fitted on."""
    teacher_vision_steps: int = 400
    """Vision pretraining steps of the teacher before its SFT (`pipeline pretrain-vision`, batch 32): without
    them the teacher answers from question priors (bench/results/teacher_recipe.md)."""
    teacher_steps: int = 400
    """Teacher SFT steps (batch 32)."""
    cache_samples: int = 2000
    """easy-VQA train questions dumped with teacher-written answers (distillation data)."""
    stage_steps: tuple[int, int, int] = (100, 150, 100)
    """GenRecal stage 1, 2, 3 steps (batch 16); the SFT and ULD baselines get stage 2 + stage 3 steps."""
    test_samples: int = 1000
    """easy-VQA test questions per evaluation."""
    dump_flags: tuple[str, ...] = ()
    """Extra dump-teacher options."""


FULL = DemoSettings()
# a 12-step teacher mostly writes empty answers: in the quick run, answers that disagree with the data
# set's are replaced by the reference, so that the cache is not empty
QUICK = DemoSettings(teacher_samples=256, teacher_vision_steps=4, teacher_steps=12, cache_samples=48, stage_steps=(4, 4, 4), test_samples=32,
                     dump_flags=("--keep-if-correct", "--on-incorrect", "reference"))


def plan(run: Path, s: DemoSettings) -> list[tuple[str, list[str]]]:
    """(step name, command) in order; every command is a real CLI call."""
    models, cache = run / "models", run / "cache"
    teacher, student = run / "teacher", run / "genrecal"
    # both models start from random weights, so their vision encoders must learn too (with a pretrained
    # student the method keeps it frozen); GenRecal and the SFT baseline get the same setting
    common = ["--batch-size", "16", "--num-workers", "1", "--train-vision-encoder"]
    steps = [
        ("build-teacher", ["pipeline", "build-tiny", "demo-teacher", "--out", str(models / "teacher-init")]),
        ("build-student", ["pipeline", "build-tiny", "demo-student", "--out", str(models / "student-init")]),
        ("pretrain-teacher-vision", ["pipeline", "pretrain-vision", "--model", str(models / "teacher-init"),
                                     "--data", "easy-vqa:train", "--limit", str(s.teacher_samples), "--steps",
                                     str(s.teacher_vision_steps), "--out", str(models / "teacher-vision")]),
        ("train-teacher", ["student", "train", "--stage", "3", "--data", "easy-vqa:train", "--data-limit",
                           str(s.teacher_samples), "--student", str(models / "teacher-vision"), "--out", str(teacher),
                           "--steps", str(s.teacher_steps), "--batch-size", "32", "--lr", "1e-3", "--lr-end", "1e-4",
                           "--num-workers", "1", "--train-vision-encoder"]),
        ("dump-teacher", ["pipeline", "dump-teacher", "--model", str(teacher / "stage3"), "--data", "easy-vqa:train",
                          "--limit", str(s.cache_samples), "--responses", "generate", "--out", str(cache),
                          "--top-k", "16", "--question-features-fraction", "0.25", "--max-new-tokens", "8",
                          *s.dump_flags]),
    ]
    for stage, n in zip((1, 2, 3), s.stage_steps):
        steps.append((f"genrecal-stage{stage}", ["student", "train", "--stage", str(stage), "--cache", str(cache),
                                                 "--student", str(models / "student-init"), "--out", str(student),
                                                 "--steps", str(n), "--lr", "1e-3", "--lr-end", "1e-4", *common]))
    steps.append(("sft-baseline", ["student", "train", "--stage", "3", "--from-student", "--cache", str(cache),
                                   "--student", str(models / "student-init"), "--out", str(run / "sft"),
                                   "--steps", str(s.stage_steps[1] + s.stage_steps[2]), "--lr", "1e-3",
                                   "--lr-end", "1e-4", *common]))
    # ULD (the cross-tokenizer baseline without a Recalibrator): a stage-2 run from the same student init
    steps.append(("uld-baseline", ["student", "train", "--stage", "2", "--method", "uld", "--cache", str(cache),
                                   "--student", str(models / "student-init"), "--out", str(run / "uld"),
                                   "--steps", str(s.stage_steps[1] + s.stage_steps[2]), "--lr", "1e-3",
                                   "--lr-end", "1e-4", *common]))
    for name, folder in evaluated(run).items():
        steps.append((f"eval-{name}", ["student", "eval", "--model", str(folder), "--data", "easy-vqa:test",
                                       "--limit", str(s.test_samples), "--batch-size", "32", "--no-progress"]))
    return steps


def build_named(name: str, out: str | Path, seed: int = 0) -> Path:
    """A named tiny configuration (TINY_CONFIGS) or a plain tiny family (pipeline/vlm/tiny.py FAMILIES)."""
    from pipeline.vlm.tiny import FAMILIES, build_tiny_vlm

    if name in TINY_CONFIGS:
        config = dict(TINY_CONFIGS[name])
        return build_tiny_vlm(config.pop("family"), out, tokenizer=config.pop("tokenizer"), seed=seed, **config)
    if name in FAMILIES:
        return build_tiny_vlm(name, out, seed=seed)
    raise ValueError(f"unknown tiny model {name!r}; choose from {sorted(TINY_CONFIGS) + sorted(FAMILIES)}")


def evaluated(run: Path) -> dict[str, Path]:
    """The table's rows. The base student is the init every student run starts from (random weights: the demo
    has no pretrained student; bench/quality.py starts from a trained one)."""
    return {"teacher": run / "teacher" / "stage3", "base-student": run / "models" / "student-init",
            "student-sft": run / "sft" / "stage3", "student-genrecal": run / "genrecal" / "stage3",
            "student-uld": run / "uld" / "stage2"}


def run_demo(out: str | Path = "runs/demo", quick: bool = False, echo=print) -> list[dict]:
    """Run (or finish) the demo in `out`; returns the table rows."""
    run = Path(out)
    settings = QUICK if quick else FULL
    run.mkdir(parents=True, exist_ok=True)
    _check_settings(run, settings)
    started = time.perf_counter()
    for name, command in plan(run, settings):
        _run_step(run, name, command, echo)
    rows = collect_results({name: _eval_file(folder, settings) for name, folder in evaluated(run).items()})
    curves = read_curves({"teacher SFT (from scratch)": run / "teacher" / "stage3",
                          **{f"GenRecal stage {k}": run / "genrecal" / f"stage{k}" for k in (1, 2, 3)},
                          "SFT baseline": run / "sft" / "stage3", "ULD baseline": run / "uld" / "stage2"})
    figure = write_figure(run / "demo.png", curves, rows)
    table = format_table(rows, f"easy-VQA test, first {settings.test_samples} questions")
    write_atomic(run / "results.json", json.dumps({"settings": asdict(settings), "rows": rows}, indent=2).encode())
    echo(table)
    echo(f"\nfigure: {figure}\nresults: {run / 'results.json'}  ({time.perf_counter() - started:.0f} s this run)")
    return rows


def _eval_file(folder: Path, settings: DemoSettings) -> Path:
    from pipeline.vlm.evaluate import default_output

    return default_output(str(folder), "easy-vqa:test", settings.test_samples)


def _check_settings(run: Path, settings: DemoSettings) -> None:
    path = run / "steps" / "settings.json"
    wanted = json.loads(json.dumps(asdict(settings)))
    if path.exists() and json.loads(path.read_text()) != wanted:
        raise ValueError(f"{run} holds a demo made with other settings ({path}); use another --out")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(wanted, indent=2).encode())


def _run_step(run: Path, name: str, command: list[str], echo) -> None:
    marker = run / "steps" / f"{name}.json"
    if marker.exists():
        echo(f"[done] {name}")
        return
    echo(f"[run ] {name}: {shlex.join(command)}")
    started = time.perf_counter()
    argv = [sys.executable, "-m", {"pipeline": "pipeline.cli", "student": "student.cli"}[command[0]], *command[1:]]
    result = subprocess.run(argv)
    if result.returncode != 0:
        raise RuntimeError(f"demo step {name} failed (exit {result.returncode}); fix the cause and rerun: "
                           "finished steps are kept")
    seconds = time.perf_counter() - started
    write_atomic(marker, json.dumps({"command": command, "seconds": round(seconds, 1)}).encode())
    echo(f"[ok  ] {name} ({seconds:.0f} s)")
