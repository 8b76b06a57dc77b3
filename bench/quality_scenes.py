"""Distillation quality on the scenes task (pipeline/vlm/scenes.py), positive control first.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_scenes.py --work /work/scratch/scenes             # the control
    OMP_NUM_THREADS=1 .venv/bin/python bench/quality_scenes.py --work W --setting pool=200,temperature=1.0
    .venv/bin/python bench/quality_scenes.py --work /tmp/scenes-smoke --smoke                           # minutes

A distillation benchmark must first show that a method known to work beats SFT on it (issue: the easy-VQA table
said more about the task than the methods). This script builds, once per WORK folder (every finished piece is
reused on rerun, so an interrupted run goes on where it stopped):
1. the teacher: a tiny Qwen2-VL (tiny BPE tokenizer, hidden 128, 4 layers, 84-pixel input: one image token per
   grid cell), its vision tower pretrained on the
   scenes' cell labels (`pipeline pretrain-vision`), then plain SFT on scenes:train records 0..TEACHER_DATA-1;
   scored on held-out train records (HELD_OUT, never trained on) -> WORK/teacher;
2. the base student: the same family and tokenizer (the same-tokenizer pair), narrower (hidden 64, 2 layers),
   its vision tower pretrained until the cell probe reads the scene (then frozen, as the method keeps it), then
   SFT on a small labelled slice (BASE_SLICE, disjoint from the pool) -> WORK/base;
3. the pool: the teacher's own answers to POOL prompts (disjoint from the base slice and held-out records), at
   sampling temperature `temperature` (a describe answer's object order is then the teacher's random choice, as
   a human annotator's would be), dumped with top-k log-probs -> WORK/pool-<setting>/cache;
4. the variants, each from the base student with the same number of student updates:
   - sft: SFT on the teacher's answers (`--stage 3 --from-student`);
   - kd-only: KL(teacher top-k + tail || student) alone (`--method kd --student-ce-weight 0`): the loss scale of
     SFT (one term, weight 1), so the comparison is not CE+KL (2 terms) against CE;
   - kd: CE + KL, as users run it (its loss is about twice SFT's: the gradient clip then differs; see the issue);
   - genrecal, genrecal-tokens (`--variants`): stage 1 (the Recalibrator alone) then stage 2, default layout and
     the teacher-tokens layout, with question reliance per slot in their rows;
   scored on the held-out records (score: the mean over question types of the per-type mean of
   `pipeline.vlm.scenes.score_answer`).
Results: WORK/results.jsonl (one line per run) and bench/results/quality_scenes.{md,json} (`--report`).
Threads: one per process (`torch.set_num_threads(1)`), seeds fixed everywhere; what is not deterministic is
recorded in the results file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Setting:
    """One point of the settings search (the part of the run that the positive control may need changed)."""

    pool: int = 300
    """Pool prompts the students distil from (the low-data regime)."""
    temperature: float = 1.0
    """Sampling temperature of the teacher's pool answers (0: greedy)."""
    updates: int = 300
    """Student updates of every variant."""
    batch_size: int = 16
    lr: float = 5e-4
    top_k: int = 32

    def name(self) -> str:
        return f"pool{self.pool}-t{self.temperature:g}-u{self.updates}"


@dataclass(frozen=True)
class Build:
    """The teacher and base student (shared by every setting)."""

    teacher_data: int = 12000
    teacher_vision_steps: int = 800
    teacher_sft_steps: int = 4000
    base_slice: tuple[int, int] = (12000, 12200)
    student_vision_steps: int = 800
    base_sft_steps: int = 150
    pool_start: int = 13000
    held_out: tuple[int, int] = (19000, 19400)
    seeds: tuple[int, ...] = (0, 1, 2)


SMOKE = Build(teacher_data=200, teacher_vision_steps=4, teacher_sft_steps=6, base_slice=(12000, 12032),
              student_vision_steps=4, base_sft_steps=3, held_out=(19000, 19016), seeds=(0, 1))
# 84 pixels: Qwen2-VL's 14-pixel patches merged 2 x 2 give 3 x 3 image tokens, one per cell of the scene's grid
# (at 56 pixels, 4 tokens for 9 cells: the teacher reached a held-out score of 0.34, describe F1 0.12)
TEACHER = dict(family="qwen2-vl-tiny", tokenizer="tiny-bpe", hidden_size=128, num_hidden_layers=4,
               intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, image_size=84)
STUDENT = dict(TEACHER, hidden_size=64, num_hidden_layers=2, intermediate_size=256)
VARIANTS = {"sft": {}, "kd-only": {"method": "kd", "student_ce_weight": 0.0, "kd_weight": 1.0},
            "kd": {"method": "kd", "student_ce_weight": 1.0, "kd_weight": 1.0},
            # GenRecal: stage 1 (the Recalibrator alone, a third of the updates; the student does not move), then
            # stage 2 with every student update; the two layouts the issue compares (question reliance per slot)
            "genrecal": {"method": "genrecal"},
            "genrecal-tokens": {"method": "genrecal", "layout": "teacher-tokens"}}
CONTROL = ("sft", "kd-only", "kd")  # what runs by default: the positive control


def _build(config: dict, out: Path) -> Path:
    from pipeline.vlm.tiny import build_tiny_vlm

    config = dict(config)
    return build_tiny_vlm(config.pop("family"), out, tokenizer=config.pop("tokenizer"), seed=0, **config)


def _done(folder: Path) -> bool:
    from student.checkpoint import FINISHED_FILE

    return (folder / FINISHED_FILE).exists()


def write_range(start: int, stop: int, out: Path, answers: dict[str, str] | None = None) -> tuple[str, str]:
    """scenes:train records start..stop-1 as a TRL jsonl file (images as PNG files beside it); returns (data, root)."""
    from pipeline.vlm.data import read_samples
    from pipeline.vlm.scenes import scene_png

    if out.exists():
        return str(out), str(out.parent / "images")
    (out.parent / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, s in enumerate(read_samples("scenes:train")):
        if i >= stop:
            break
        if i < start:
            continue
        name = f"{i:06d}.png"
        (out.parent / "images" / name).write_bytes(scene_png(s.meta["scene"]))
        answer = s.answer if answers is None else answers[s.sample_id]
        lines.append(json.dumps({"id": s.sample_id, "messages": s.messages + [
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}], "images": [name]}))
    tmp = out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    return str(out), str(out.parent / "images")


def held_out_score(model: Path, b: Build, out: Path) -> dict:
    from pipeline.vlm.evaluate import evaluate

    if out.exists():
        return json.loads(out.read_text())
    return evaluate(str(model), "scenes:train", skip=b.held_out[0], limit=b.held_out[1] - b.held_out[0],
                    batch_size=32, max_new_tokens=48, out=str(out), progress=False)


def sft_model(init: Path, out: Path, data: tuple[str, str], steps: int, lr: float, vision: bool) -> Path:
    from student.config import TrainConfig
    from student.train import train_stage

    if not _done(out / "stage3"):
        train_stage(TrainConfig(cache=None, data=data[0], image_root=data[1], student=str(init), out=str(out), stage=3,
                                steps=steps, batch_size=32, lr=1e-3, lr_end=1e-4, num_workers=0,
                                train_vision_encoder=vision, seed=0), resume=(out / "stage3" / "trainer_state").exists(),
                    progress=False)
    return out / "stage3"


def vision_pretrained(init: Path, out: Path, b: Build, steps: int, log) -> Path:
    from pipeline.vlm.vision_pretrain import pretrain_vision

    if not (out / "config.json").exists():
        pretrain_vision(init, out, "scenes:train", skip=0, limit=b.teacher_data, steps=steps, lr=2e-3, seed=0,
                        held_out=(b.held_out[0], b.held_out[1] - b.held_out[0]), log=log)
    return out


def trained_model(work: Path, b: Build, name: str, config: dict, vision_steps: int, data: tuple[int, int],
                  sft_steps: int, train_vision: bool) -> Path:
    """WORK/<name>: built from `config`, its vision tower pretrained on the cell labels, then SFT on scenes:train
    records data[0]..data[1]-1 (the vision tower trained too or kept frozen); logs its held-out score."""
    folder = work / name
    log = _logger(folder / "log.txt")
    init = folder / "init" if (folder / "init" / "config.json").exists() else _build(config, folder / "init")
    vpre = vision_pretrained(init, folder / "vision", b, vision_steps, log)
    final = sft_model(vpre, folder, write_range(*data, work / "data" / f"{name}.jsonl"), sft_steps, 1e-3, train_vision)
    log(f"{name} held-out: {json.dumps(_scores(held_out_score(final, b, folder / 'held_out.json')))}")
    return final


def teacher(work: Path, b: Build) -> Path:
    return trained_model(work, b, "teacher", TEACHER, b.teacher_vision_steps, (0, b.teacher_data), b.teacher_sft_steps,
                         train_vision=True)


def base_student(work: Path, b: Build) -> Path:
    """The encoder stays frozen in the base SFT, as the method keeps it."""
    return trained_model(work, b, "base", STUDENT, b.student_vision_steps, b.base_slice, b.base_sft_steps,
                         train_vision=False)


def pool_cache(work: Path, b: Build, s: Setting, teacher_folder: Path) -> Path:
    from pipeline.dump import dump_teacher
    from pipeline.dump_config import DumpConfig
    from pipeline.vlm.generation import GenerationSettings

    folder = work / f"pool{s.pool}-t{s.temperature:g}"
    cache = folder / "cache"
    if (folder / "done.json").exists():
        return cache
    data = write_range(b.pool_start, b.pool_start + s.pool, folder / "prompts.jsonl")
    stats = dump_teacher(DumpConfig(model=str(teacher_folder), data=data[0], image_root=data[1], out=str(cache),
                                    responses="generate", top_k=s.top_k, question_features_fraction=0.25,
                                    generation=GenerationSettings(max_new_tokens=48, temperature=s.temperature, seed=0)),
                         progress=False)
    (folder / "done.json").write_text(json.dumps({"written": stats.written, "rejected": stats.rejected,
                                                  "reasons": stats.reject_reasons}))
    return cache


def run_variant(work: Path, b: Build, s: Setting, cache: Path, base: Path, variant: str, seed: int) -> dict:
    import torch

    from student.config import LossConfig, TrainConfig
    from student.train import train_stage

    torch.set_num_threads(1)
    run = work / "runs" / s.name() / variant / f"seed{seed}"
    row_file = run / "row.json"
    if row_file.exists():
        return json.loads(row_file.read_text())
    extra = dict(VARIANTS[variant])
    method = extra.pop("method", None)
    stages = [(3, s.updates)] if method is None else [(2, s.updates)]
    if method == "genrecal":
        stages = [(1, max(1, s.updates // 3)), (2, s.updates)]
    common = dict(cache=str(cache), student=str(base), out=str(run), seed=seed, batch_size=s.batch_size, lr=s.lr,
                  lr_end=s.lr / 10, num_workers=0, attention_every=25,
                  **({"method": method, "loss": LossConfig(**extra)} if method else {}))
    started = time.perf_counter()
    for stage, steps in stages:
        cfg = TrainConfig(stage=stage, steps=steps, from_student=stage != 2 or method != "genrecal", **common)
        while not _done(run / f"stage{stage}"):
            train_stage(cfg, resume=(run / f"stage{stage}" / "trainer_state").exists(), progress=False)
    seconds = time.perf_counter() - started
    stage = stages[-1][0]
    result = held_out_score(run / f"stage{stage}", b, run / "held_out.json")
    row = {"setting": asdict(s), "variant": variant, "seed": seed, "score": result["score"],
           "per_type": {k: v["score"] for k, v in result["per_type"].items()}, "train_seconds": round(seconds, 1),
           **({"reliance": reliance(run / "stage2")} if method == "genrecal" else {})}
    row_file.write_text(json.dumps(row))
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{s.name()} {variant:8s} seed {seed}: held-out score {row['score']:.3f} {row['per_type']} "
          f"({seconds:.0f} s)", flush=True)
    return row


def reliance(stage_folder: Path) -> dict:
    """Question reliance of a GenRecal stage, all / first / later slots: the mean of its last four measurements."""
    from pipeline.run_metrics import read_metrics

    records = [r for r in read_metrics(stage_folder) if "question_reliance" in r][-4:]
    keys = ("question_reliance", "question_reliance_first", "question_reliance_later")
    return {k: round(statistics.mean(r[k] for r in records), 4) for k in keys} if records else {}


def _scores(result: dict) -> dict:
    return {"score": round(result["score"], 4), **{k: round(v["score"], 4) for k, v in result["per_type"].items()}}


def _logger(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)

    def log(line: str) -> None:
        print(line, flush=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    return log


def summary(rows: list[dict]) -> list[str]:
    """One line per (setting, variant): mean +- std of the held-out score over seeds, and per seed."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((json.dumps(row["setting"], sort_keys=True), row["variant"]), []).append(row)
    lines = []
    for (setting, variant), group in sorted(groups.items()):
        scores = [r["score"] for r in sorted(group, key=lambda r: r["seed"])]
        spread = statistics.stdev(scores) if len(scores) > 1 else 0.0
        lines.append(f"{Setting(**json.loads(setting)).name()} {variant:8s} {statistics.mean(scores):.3f} +- "
                     f"{spread:.3f}  seeds {', '.join(f'{x:.3f}' for x in scores)}")
    return lines


def report(work: Path, commit: str) -> None:
    """bench/results/quality_scenes.{json,md} from WORK: the teacher, the base student and every run's row (the
    positive control's settings search is every setting in WORK/results.jsonl). The md's hand-written part, below
    its marker line, is kept when it is written again."""
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    models = {name: json.loads((work / folder / "held_out.json").read_text())
              for name, folder in (("teacher", "teacher"), ("base_student", "base"))}
    data = {"task": "scenes", "commit": commit, "split": "held-out scenes:train records (the test split is not used yet)",
            **{name: {"score": r["score"], "per_type": {k: v["score"] for k, v in r["per_type"].items()}}
               for name, r in models.items()},
            "rows": [{"pair": "same", "regime": "low", **row} for row in rows]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "quality_scenes.json").write_text(json.dumps(data, indent=1) + "\n")
    md = RESULTS / "quality_scenes.md"
    kept = md.read_text().split(MARKER, 1)[1] if md.exists() and MARKER in md.read_text() else "\n(to be written)\n"
    lines = ["# Distillation quality on scenes: the positive control", "",
             f"Generated by `bench/quality_scenes.py --report` from `{work}` at commit {commit}; scores are on held-out "
             "scenes:train records (mean over question types of `pipeline.vlm.scenes.score_answer`).", "",
             "| model | score | " + " | ".join(QUESTION_TYPES_ORDER) + " |", "|---|---|" + "---|" * len(QUESTION_TYPES_ORDER)]
    for name, r in models.items():
        lines.append(f"| {name} | {r['score']:.3f} | " + " | ".join(f"{r['per_type'][k]['score']:.3f}"
                                                                  for k in QUESTION_TYPES_ORDER) + " |")
    lines += ["", "Every setting run (mean +- std over seeds, then each seed):", "", "```", *summary(rows), "```", "",
              MARKER.strip()]
    md.write_text("\n".join(lines) + kept)


MARKER = "\n<!-- written by hand below -->\n"
QUESTION_TYPES_ORDER = ("describe", "count", "attribute", "relation")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", required=True, type=Path)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: minutes, for checking the script")
    parser.add_argument("--setting", action="append", default=[],
                        help="k=v,... overrides of Setting (repeatable: one run of the variants per setting)")
    parser.add_argument("--variants", nargs="+", default=list(CONTROL), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", help="these seeds only (default: Build.seeds)")
    parser.add_argument("--summary", action="store_true", help="print the summary of WORK/results.jsonl and stop")
    parser.add_argument("--report", metavar="COMMIT", help="write bench/results/quality_scenes.{json,md} and stop")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    work = args.work
    if args.report:
        report(work, args.report)
        return
    if args.summary:
        rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
        print("\n".join(summary(rows)))
        return
    b = SMOKE if args.smoke else Build()
    b = replace(b, seeds=tuple(args.seeds)) if args.seeds else b
    settings = [Setting(pool=16, updates=4, batch_size=4)] if args.smoke else [Setting()]
    if args.setting:
        settings = [replace(settings[0], **{k: type(getattr(settings[0], k))(v) for k, v in
                                            (kv.split("=") for kv in text.split(","))}) for text in args.setting]
    work.mkdir(parents=True, exist_ok=True)
    teacher_folder = teacher(work, b)
    base = base_student(work, b)
    for s in settings:
        cache = pool_cache(work, b, s, teacher_folder)
        for seed in b.seeds:
            for variant in args.variants:
                run_variant(work, b, s, cache, base, variant, seed)
    rows = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    print("\n".join(summary(rows)))


if __name__ == "__main__":
    main()
