"""The pieces of bench/quality.py's runs: its settings, the teacher, the base student, the pool cache, the scores
and one variant's training (`run_variant`). bench/quality.py (the command), bench/quality_same_tokenizer.py and
bench/quality_report.py import them; this module imports none of those three, so the data flows one way:

    quality_runs -> quality_tables -> quality_same_tokenizer -> quality_report -> quality (the command)
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from student.config import LossConfig  # noqa: E402

TEACHER_CHAIN = ("best", "best-more", "best-more2")  # best-more3 (800 more steps) not run: no time this session
VARIANTS: dict[str, tuple[str | None, LossConfig | None]] = {  # name -> (method, GenRecal loss settings)
    "sft": (None, None),  # no method: stage 3 (plain SFT) alone
    "genrecal": ("genrecal", LossConfig()),
    "genrecal-old-layout": ("genrecal", LossConfig(layout="teacher-last-prompt")),
    "genrecal-noreg": ("genrecal", LossConfig(regularizer=False)),
    "genrecal-klonly": ("genrecal", LossConfig(ce_weight=0.0)),
    "genrecal-topk": ("genrecal", LossConfig(teacher_distribution="topk")),
    "uld": ("uld", None),
}
# follow-ups, not run by default (--variants): the same as their base variant with the student's vision
# encoder trained too (the method keeps it frozen; this measures how much the frozen encoder bounds the student)
FOLLOW_UPS = {"sft-vision": "sft", "genrecal-vision": "genrecal"}
# the methods that need the teacher's tokenizer: the same-tokenizer pair only (bench/quality_same_tokenizer.py)
SAME_TOKENIZER_ONLY: dict[str, tuple[str, LossConfig | None]] = {"kd": ("kd", None), "vlsi": ("vlsi", None)}


@dataclass(frozen=True)
class Settings:
    """Everything the run depends on; written to WORK/settings.json and into quality.json."""

    teacher_chain: tuple[str, ...] = TEACHER_CHAIN
    slice: tuple[int, int] = (20000, 22000)
    pool: tuple[int, int] = (22000, 30000)
    held_out: tuple[int, int] = (30000, 30500)
    base_vision_steps: int = 600
    base_sft_steps: int = 300
    stage_steps: tuple[int, int, int] = (100, 200, 100)
    """GenRecal stage 1 (Recalibrator only), 2, 3; every other variant makes stage 2 + 3 student updates."""
    batch_size: int = 16
    lr: float = 5e-4
    lr_end: float = 5e-5
    low_fraction: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    curve_every: int = 50
    curve_questions: int = 300
    test: int = 1000
    reliance_every: int = 25


SMOKE = Settings(teacher_chain=("smoke",), slice=(20000, 20200), pool=(22000, 22120), base_vision_steps=4,
                 base_sft_steps=4, stage_steps=(3, 4, 2), seeds=(0, 1), curve_every=3, curve_questions=16, test=24,
                 low_fraction=0.25, reliance_every=2)


def _refs(stop: int) -> list[str]:
    from pipeline.vlm.data import read_samples

    return [s.images[0].ref for _, s in zip(range(stop), read_samples("easy-vqa:train"))]


def write_questions(start: int, stop: int, exclude: tuple[tuple[int, int], ...], path: Path) -> tuple[str, str]:
    """Records start..stop-1 of easy-VQA train as a TRL jsonl file, without those whose image also appears in an
    `exclude` range; returns (data source, image root)."""
    from pipeline.vlm.data import image_root_for, read_samples
    from pipeline.vlm.images import parse_image_ref

    refs = _refs(max([stop] + [b for _, b in exclude]))
    taken = {refs[i] for a, b in exclude for i in range(a, b)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for i, s in enumerate(read_samples("easy-vqa:train")):
            if i >= stop:
                break
            if i < start or s.images[0].ref in taken:
                continue
            f.write(json.dumps({"id": s.sample_id, "messages": s.messages + [
                {"role": "assistant", "content": [{"type": "text", "text": s.answer}]}],
                "images": [parse_image_ref(spec.ref)[1] for spec in s.images]}) + "\n")
    tmp.replace(path)
    return str(path), image_root_for("easy-vqa:train")


def teacher(work: Path, s: Settings) -> Path:
    """The teacher folder: bench/teacher_recipe.py's chain, trained once into WORK/teacher."""
    import teacher_recipe

    out = work / "teacher"
    done = {json.loads(line)["recipe"] for line in (out / "results.jsonl").read_text().splitlines()} \
        if (out / "results.jsonl").exists() else set()
    for name in s.teacher_chain:
        if name not in done:
            print(f"teacher: {name}", flush=True)
            teacher_recipe.run_recipe(name, teacher_recipe.RECIPES[name], out)
    return out / s.teacher_chain[-1] / "stage3"


def _demo_student(out: Path) -> Path:
    from pipeline.demo.run import build_named

    return build_named("demo-student", out, 0)


def base_student(work: Path, s: Settings, base: Path | None = None, build=_demo_student) -> Path:
    """The student `build(folder)` makes (default: the demo student, tiny LLaVA, Mistral tokenizer), vision-pretrained
    and SFT-trained on the labelled slice, in `base` (default WORK/base)."""
    from pipeline.vlm.vision_pretrain import pretrain_vision
    from student.checkpoint import FINISHED_FILE
    from student.config import TrainConfig
    from student.train import train_stage

    base = base or work / "base"
    if (base / "stage3" / FINISHED_FILE).exists():
        return base / "stage3"
    started, cpu = time.perf_counter(), time.process_time()
    init = build(base / "init")
    vpre = pretrain_vision(init, base / "vision-pretrained", "easy-vqa:train", skip=s.slice[0],
                           limit=s.slice[1] - s.slice[0], steps=s.base_vision_steps, lr=2e-3, seed=0)
    data, root = write_questions(*s.slice, ((0, s.slice[0]),), base / "slice.jsonl")
    train_stage(TrainConfig(cache=None, data=data, image_root=root, student=str(vpre), out=str(base), stage=3,
                            steps=s.base_sft_steps, batch_size=32, lr=1e-3, lr_end=1e-4, num_workers=0,
                            train_vision_encoder=True, seed=0), progress=False)
    (base / "train_seconds.json").write_text(json.dumps({"seconds": time.perf_counter() - started,
                                                         "cpu_seconds": time.process_time() - cpu}))
    return base / "stage3"


def pool_cache(work: Path, s: Settings, teacher_folder: Path, cache: Path | None = None,
               layers: tuple[int, ...] = ()) -> Path:
    """The teacher's answers to the pool questions, dumped once into `cache` (default WORK/cache; `layers`: the
    intermediate teacher layers to store too, dump-teacher --layers); the dump resumes by itself."""
    from pipeline.dump import dump_teacher
    from pipeline.dump_config import DumpConfig
    from pipeline.vlm.generation import GenerationSettings

    cache = cache or work / "cache"
    marker = cache.with_name(cache.name + ".done.json")
    if marker.exists():
        return cache
    data, root = write_questions(*s.pool, ((0, s.pool[0]), s.held_out), cache.parent / "pool.jsonl")
    started, cpu = time.perf_counter(), time.process_time()
    stats = dump_teacher(DumpConfig(model=str(teacher_folder), data=data, image_root=root, out=str(cache),
                                    responses="generate", top_k=16, question_features_fraction=0.25, layers=layers,
                                    generation=GenerationSettings(max_new_tokens=8)), progress=True)
    marker.write_text(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu,
                                  "stats": str(stats)}))
    return cache


def regime_ids(cache: Path, fraction: float) -> tuple[str, ...] | None:
    from pipeline.store.reader import CacheReader

    if fraction >= 1.0:
        return None
    ids = sorted(CacheReader(cache).sample_ids)
    random.Random(0).shuffle(ids)  # one fixed subset for every seed and variant
    return tuple(sorted(ids[: max(1, int(len(ids) * fraction))]))


def held_out_accuracy(model: Path, s: Settings, out: Path, limit: int | None = None) -> dict:
    from pipeline.vlm.evaluate import evaluate

    if out.exists():
        return json.loads(out.read_text())
    return evaluate(str(model), "easy-vqa:train", skip=s.held_out[0], limit=limit or s.held_out[1] - s.held_out[0],
                    batch_size=32, max_new_tokens=6, out=str(out), progress=False)


def test_accuracy(model: Path, s: Settings, out: Path) -> dict:
    from pipeline.vlm.evaluate import evaluate

    if out.exists():
        return json.loads(out.read_text())
    return evaluate(str(model), "easy-vqa:test", limit=s.test, batch_size=32, max_new_tokens=6, out=str(out),
                    progress=False)


def variant_stages(variant: str, s: Settings) -> list[tuple[int, int, dict]]:
    """(stage, steps, TrainConfig fields) of a variant; every one makes stage 2 + 3 student updates."""
    from student.methods import METHODS

    method, loss = (VARIANTS | SAME_TOKENIZER_ONLY)[FOLLOW_UPS.get(variant, variant)]
    vision = {"train_vision_encoder": True} if variant in FOLLOW_UPS else {}
    updates = s.stage_steps[1] + s.stage_steps[2]
    if method is None:
        return [(3, updates, {"from_student": True, **vision})]
    if 1 not in METHODS[method].stages:  # kd, uld: their one stage 2 from the base student makes every update
        return [(2, updates, {"from_student": True, "method": method, **vision})]
    # stage 1 trains only what is beside the student (the Recalibrator, VLsI's verbalizers)
    extra = {"method": method, **({"loss": loss} if loss is not None else {})}
    return [(stage, n, {**extra, **vision}) for stage, n in zip((1, 2, 3), s.stage_steps)]


def run_variant(runs: str, s: Settings, cache: str, base: str, regime: str, seed: int, variant: str,
                ids: tuple[str, ...] | None, pair: str = "cross-tokenizer") -> dict:
    """Train one variant from the base student (curves for the first seed), score it on test; returns its row.
    `runs`: the pair's runs folder (WORK/runs for the cross-tokenizer pair)."""
    import torch
    from student.checkpoint import FINISHED_FILE
    from student.config import TrainConfig
    from student.train import train_stage

    torch.set_num_threads(1)
    run = Path(runs) / regime / variant / f"seed{seed}"
    row_file = run / "row.json"
    if row_file.exists():
        return json.loads(row_file.read_text())
    curves = seed == s.seeds[0]
    common = dict(cache=cache, student=base, out=str(run), seed=seed, batch_size=s.batch_size, lr=s.lr,
                  lr_end=s.lr_end, num_workers=0, sample_ids=ids, attention_every=s.reliance_every)
    seconds, cpu, updates_before = 0.0, 0.0, 0
    for stage, steps, extra in variant_stages(variant, s):
        cfg = TrainConfig(stage=stage, steps=steps, **common, **extra)
        folder = run / f"stage{stage}"
        while not (folder / FINISHED_FILE).exists():
            resume = (folder / "trainer_state").exists()
            chunk = s.curve_every if curves and stage != 1 else None
            t0, c0 = time.perf_counter(), time.process_time()
            metrics = train_stage(cfg, resume=resume, progress=False, stop_after=chunk)
            seconds, cpu = seconds + time.perf_counter() - t0, cpu + time.process_time() - c0
            if chunk and metrics:
                step = updates_before + metrics[-1]["step"]
                held_out_accuracy(folder, s, run / "curve" / f"{step:06d}.json", s.curve_questions)
        if stage != 1:
            updates_before += steps
    final = run / f"stage{variant_stages(variant, s)[-1][0]}"
    result = test_accuracy(final, s, run / "test.json")
    row = {"pair": pair, "regime": regime, "variant": variant, "seed": seed, "accuracy": result["accuracy"],
           "per_type": {k: v["accuracy"] for k, v in result["per_type"].items()}, "train_seconds": round(seconds, 1),
           "train_cpu_seconds": round(cpu, 1)}  # CPU: one thread, so the compute time when the machine is shared
    row_file.write_text(json.dumps(row))
    print(f"{pair.split('-')[0]:5s} {regime:4s} {variant:20s} seed {seed}: test {100 * row['accuracy']:.1f}% "
          f"({seconds:.0f} s)", flush=True)
    return row
