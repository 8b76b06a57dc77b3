"""The tables of bench/quality.py's report, per pair: reference models, the test summary, held-out curves and
GenRecal's question reliance (markdown lines and the dicts they come from). bench/quality_report.py and
bench/quality_same_tokenizer.py both draw their sections with these.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

TYPES = ("shape", "color", "yes/no")


def _scores(result: dict) -> dict:
    return {"accuracy": result["accuracy"], "per_type": {k: v["accuracy"] for k, v in result["per_type"].items()}}


def reference_models(work: Path, s, teacher_folder: Path, base: Path, folder: Path | None = None) -> dict:
    """The teacher's (scored once, WORK/reference/teacher) and the base student's (in `folder`, default
    WORK/reference) held-out and test scores."""
    from quality_runs import held_out_accuracy, test_accuracy

    out = {}
    for name, model in (("teacher", teacher_folder), ("base_student", base)):
        where = work / "reference" / name if name == "teacher" else (folder or work / "reference") / name
        held = held_out_accuracy(model, s, where / "held_out.json")
        test = test_accuracy(model, s, where / "test.json")
        out[name] = {**_scores(test), "held_out": _scores(held)}
    return out


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["pair"], row["regime"], row["variant"]), []).append(row)
    table = []
    for (pair, regime, variant), runs in groups.items():
        def stats(values):
            values = [100 * v for v in values]
            return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        table.append({"pair": pair, "regime": regime, "variant": variant, "seeds": [r["seed"] for r in runs],
                      "accuracy": stats([r["accuracy"] for r in runs]),
                      "per_type": {t: stats([r["per_type"].get(t, 0.0) for r in runs]) for t in TYPES},
                      "train_seconds": statistics.mean(r["train_seconds"] for r in runs)})
    return table


def curves(runs: Path, seed: int) -> dict:
    """regime -> variant -> [(student updates, held-out accuracy)] of the first seed's runs in a pair's `runs`."""
    out: dict = {}
    for folder in sorted(runs.glob(f"*/*/seed{seed}/curve")):
        regime, variant = folder.parts[-4], folder.parts[-3]
        points = [(int(p.stem), json.loads(p.read_text())["accuracy"]) for p in sorted(folder.glob("*.json"))]
        out.setdefault(regime, {})[variant] = points
    return out


def reliance(runs: Path, seed: int) -> dict:
    """regime -> variant -> stage -> [(step, question_reliance, question_reliance_first)] (GenRecal variants)."""
    out: dict = {}
    for metrics in sorted(runs.glob(f"*/genrecal*/seed{seed}/stage[12]/metrics.jsonl")):
        regime, variant, stage = metrics.parts[-5], metrics.parts[-4], metrics.parts[-2]
        points = []
        for line in metrics.read_text().splitlines():
            record = json.loads(line)
            if "question_reliance" in record:
                points.append((record["step"], record["question_reliance"], record["question_reliance_first"]))
        out.setdefault(regime, {}).setdefault(variant, {})[stage] = points
    return out


def _pct(pair) -> str:
    return f"{pair[0]:.1f} ± {pair[1]:.1f}"


def _tail_mean(points, index: int, n: int = 4) -> float:
    values = [p[index] for p in points[-n:]]
    return statistics.mean(values) if values else float("nan")


def pair_tables(section: dict, summary: list[dict], s: dict, names: tuple[str, ...]) -> list[str]:
    """One pair's reference models, test table, held-out curves and question reliance (markdown lines)."""
    refs = section["references"]
    lines = ["| model | held-out | test | shape | colour | yes/no |", "|---|---|---|---|---|---|"]
    for name in names:
        r = refs[name]
        lines.append(f"| {name.replace('_', ' ')} | {100 * r['held_out']['accuracy']:.1f} | {100 * r['accuracy']:.1f} | "
                     + " | ".join(f"{100 * r['per_type'].get(t, 0):.1f}" for t in TYPES) + " |")
    lines += ["", "Test accuracy (%), mean ± std over seeds:", "",
              "| regime | variant | seeds | accuracy | shape | colour | yes/no | train s |",
              "|---|---|---|---|---|---|---|---|"]
    for r in summary:
        lines.append(f"| {r['regime']} | {r['variant']} | {len(r['seeds'])} | {_pct(r['accuracy'])} | "
                     + " | ".join(_pct(r["per_type"][t]) for t in TYPES) + f" | {r['train_seconds']:.0f} |")
    lines += ["", f"Held-out accuracy (%) over student updates, seed {s['seeds'][0]} ({s['curve_questions']} "
              "held-out questions per point):", ""]
    for regime, variants in section["curves"].items():
        steps = sorted({p[0] for points in variants.values() for p in points})
        lines += [f"{regime}:", "", "| variant | " + " | ".join(map(str, steps)) + " |",
                  "|---|" + "---|" * len(steps)]
        for variant, points in variants.items():
            by_step = dict(points)
            lines.append(f"| {variant} | " + " | ".join(f"{100 * by_step[k]:.1f}" if k in by_step else ""
                                                        for k in steps) + " |")
        lines.append("")
    lines += [f"Question reliance (main-path CE with student questions shuffled minus true; mean of the last "
              f"4 logged values; seed {s['seeds'][0]}):", "",
              "| regime | variant | stage 1 | stage 1 first slot | stage 2 | stage 2 first slot |",
              "|---|---|---|---|---|---|"]
    for regime, variants in section["reliance"].items():
        for variant, stages in variants.items():
            cells = [f"{_tail_mean(stages.get(st, []), i):.3f}" for st in ("stage1", "stage2") for i in (1, 2)]
            lines.append(f"| {regime} | {variant} | " + " | ".join(cells) + " |")
    return lines
