"""Tables, JSON and figure of bench/quality.py (called by it; rerun alone with the same --work to redraw):

    .venv/bin/python bench/quality_report.py --work /work/scratch/quality

Writes RESULTS/quality.md, RESULTS/quality.json and RESULTS/quality.png. Accuracies in the JSON are fractions.
Both pairs: the cross-tokenizer one (the top-level fields, as before) and, once it has run, the same-tokenizer one
(bench/quality_same_tokenizer.py: "same_tokenizer" in the JSON, a second section in the markdown, a second row of
the figure); every row and summary entry says its "pair".
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts below, also when imported

import quality_same_tokenizer  # noqa: E402
from quality_runs import Settings, regime_ids  # noqa: E402
from quality_tables import curves, pair_tables, reference_models, reliance, summarize  # noqa: E402

# GenRecal's variants whose question reliance the figure draws
RELIANCE_FIGURE = ("genrecal", "genrecal-old-layout")

def markdown(doc: dict, command: str) -> str:
    s = doc["settings"]
    seeds = ", ".join(map(str, s["seeds"]))
    lines = ["# Distillation quality (easy-VQA; test split in the final table only)", ""]
    if "references" in doc:  # the cross-tokenizer pair has run
        lines += [f"Command: `{command}` (one run; {doc['seconds'] / 60:.0f} min wall on this 2-core machine).", "",
                  f"Seeds {seeds}. Every variant starts from the same base student and makes "
                  f"{sum(s['stage_steps'][1:])} "
                  f"student updates at batch {s['batch_size']}, lr {s['lr']} -> {s['lr_end']} (GenRecal: stage 1 "
                  f"{s['stage_steps'][0]} Recalibrator steps, stage 2 {s['stage_steps'][1]}, stage 3 "
                  f"{s['stage_steps'][2]}). Pool: train records {s['pool'][0]}..{s['pool'][1] - 1} answered by the "
                  f"teacher ({doc['pool_size']} kept); low regime: {doc['low_size']} of them. Test: first {s['test']} "
                  "easy-vqa:test questions.", ""]
        lines += pair_tables(doc, [r for r in doc["summary"] if r["pair"] == "cross-tokenizer"], s,
                             ("teacher", "base_student"))
    if "cross_tokenizer_from" in doc and "same_tokenizer" in doc:
        same = doc["same_tokenizer"]["references"]["teacher"]
        lines += [f"The cross-tokenizer section above was carried over from an earlier run ({doc['command']}); the "
                  "section below comes from another run, which trained its teacher again with the same recipe chain "
                  f"and seeds: that teacher scores {100 * same['accuracy']:.1f}% on test against "
                  f"{100 * doc['teacher']['accuracy']:.1f}% above, so the two pairs' teachers are not the same "
                  "weights.", ""]
    if "same_tokenizer" in doc:
        lines += quality_same_tokenizer.markdown(doc)
    return "\n".join(lines) + "\n"


def figure(doc: dict, path: Path) -> None:
    """A row per pair: held-out curves (full, low) and GenRecal's question reliance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sections = ([("cross-tokenizer", doc)] if "references" in doc else []) \
        + ([("same-tokenizer", doc["same_tokenizer"])] if "same_tokenizer" in doc else [])
    fig, rows = plt.subplots(len(sections), 3, figsize=(15, 4 * len(sections)), squeeze=False)
    stage1 = doc["settings"]["stage_steps"][0]
    for axes, (pair, section) in zip(rows, sections):
        for ax, regime in zip(axes[:2], ("full", "low")):
            for variant, points in section["curves"].get(regime, {}).items():
                ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker=".", label=variant)
            ax.set_title(f"{pair}: held-out accuracy, {regime} pool")
            ax.set_xlabel("student updates")
            ax.set_ylabel("%")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        ax = axes[2]
        for variant, stages in section["reliance"].get("full", {}).items():
            if variant not in RELIANCE_FIGURE:
                continue
            xs, ys = [], []
            for stage, offset in (("stage1", 0), ("stage2", stage1)):
                points = stages.get(stage, [])
                xs += [offset + p[0] for p in points]
                ys += [p[1] for p in points]
            ax.plot(xs, ys, marker=".", label=variant)
        ax.axvline(stage1, color="gray", lw=0.8)
        ax.set_title(f"{pair}: question reliance (stage 1 | 2), full pool")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def finished_rows(work: Path) -> list[dict]:
    """Every finished run's row, both pairs (rows written before there was a same-tokenizer pair: cross-tokenizer)."""
    rows = [json.loads(p.read_text()) for runs in (work / "runs", work / quality_same_tokenizer.FOLDER / "runs")
            for p in sorted(runs.glob("*/*/seed*/row.json"))]
    return [{"pair": "cross-tokenizer", **row} for row in rows]


def write(work: Path, s, teacher_folder: Path, results: Path, seconds: float, command: str) -> dict:
    """The report of every finished run in WORK. `seconds`/`command`: of the first run that made a pair's section;
    a later call (a follow-up, a redraw) keeps those."""
    from pipeline.store.reader import CacheReader
    from student.checkpoint import FINISHED_FILE

    rows = finished_rows(work)
    doc = {"rows": rows, "summary": summarize(rows), "settings": asdict(s)}
    base, cache = work / "base" / "stage3", work / "cache"
    if (base / FINISHED_FILE).exists() and (work / "cache.done.json").exists():  # the cross-tokenizer pair
        first = work / "first_run.json"
        if not first.exists():
            first.write_text(json.dumps({"seconds": seconds, "command": command}))
        cross_seconds, cross_command = (json.loads(first.read_text())[k] for k in ("seconds", "command"))
        low = regime_ids(cache, s.low_fraction)
        refs = reference_models(work, s, teacher_folder, base)
        doc |= {"command": cross_command, "teacher": {k: refs["teacher"][k] for k in ("accuracy", "per_type")},
                "base_student": {k: refs["base_student"][k] for k in ("accuracy", "per_type")},
                "references": refs, "curves": curves(work / "runs", s.seeds[0]),
                "reliance": reliance(work / "runs", s.seeds[0]), "seconds": cross_seconds,
                "pool_size": len(CacheReader(cache).sample_ids), "low_size": len(low) if low else None}
    else:  # not in WORK: an earlier run's cross-tokenizer section in RESULTS stays (e.g. after --pairs same)
        cross_command = _carry_over_cross(doc, results / "quality.json", command)
    if quality_same_tokenizer.finished(work):
        doc["same_tokenizer"] = quality_same_tokenizer.section(work, s, teacher_folder, command, seconds)
    results.mkdir(parents=True, exist_ok=True)
    (results / "quality.json").write_text(json.dumps(doc, indent=1))
    (results / "quality.md").write_text(markdown(doc, cross_command))
    figure(doc, results / "quality.png")
    print((results / "quality.md").read_text())
    return doc


CROSS_FIELDS = ("command", "teacher", "base_student", "references", "curves", "reliance", "seconds", "pool_size",
                "low_size")


def _carry_over_cross(doc: dict, previous: Path, command: str) -> str:
    """Copy the cross-tokenizer section (its fields, rows and summary) of an earlier quality.json into `doc`
    when WORK holds no cross-tokenizer run; returns the command that made it (`command` when there is none)."""
    if not previous.exists():
        return command
    old = json.loads(previous.read_text())
    if "references" not in old:
        return command
    if old["settings"] != json.loads(json.dumps(doc["settings"])):  # as JSON: tuples read back as lists
        raise SystemExit(f"{previous}: its cross-tokenizer section ran with other settings than WORK's; rerun that "
                         "pair into WORK (--pairs cross) or write the report to another --results folder")
    doc |= {k: old[k] for k in CROSS_FIELDS if k in old}
    rows = [r for r in old["rows"] if r.get("pair", "cross-tokenizer") == "cross-tokenizer"]
    doc["rows"] = rows + [r for r in doc["rows"] if r["pair"] != "cross-tokenizer"]
    doc["summary"] = summarize(doc["rows"])
    doc["cross_tokenizer_from"] = f"{previous} as it was before this report (WORK holds no cross-tokenizer run)"
    return old.get("command", "an earlier run of bench/quality.py (its command was not recorded)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    settings = json.loads((args.work / "settings.json").read_text())
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings.items()})
    write(args.work, s, args.work / "teacher" / s.teacher_chain[-1] / "stage3", args.results, float("nan"),
          "python bench/quality.py --work " + str(args.work))


if __name__ == "__main__":
    main()
