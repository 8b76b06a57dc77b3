"""The demo's report: one accuracy table (printed and saved as JSON) and one PNG figure with the loss
curves of every training stage and the accuracy bars.

    rows = collect_results(run_dir, EVALUATED)   # [{"model", "folder", "accuracy", "per_type", ...}]
    print(format_table(rows)); write_figure(run_dir / "demo.png", curves, rows)
"""

from __future__ import annotations

import json
from pathlib import Path

QUESTION_TYPES = ("shape", "color", "yes/no")


def collect_results(evals: dict[str, Path]) -> list[dict]:
    """One row per evaluated model from its eval JSON (written by `student eval`)."""
    rows = []
    for name, path in evals.items():
        result = json.loads(Path(path).read_text())
        row = {"model": name, "folder": result["model"], "samples": result["samples"], "accuracy": result["accuracy"]}
        for kind in QUESTION_TYPES:
            row[kind] = result["per_type"].get(kind, {}).get("accuracy")
        rows.append(row)
    return rows


def format_table(rows: list[dict], title: str = "") -> str:
    """A Markdown table: model, samples, accuracy overall and per question type."""
    head = ["model", "test samples", "accuracy", *QUESTION_TYPES]
    lines = [f"{title}\n" if title else "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["model"], str(row["samples"]), _pct(row["accuracy"]), *(_pct(row[k]) for k in QUESTION_TYPES)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line is not None)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def read_curves(stages: dict[str, Path]) -> dict[str, list[dict]]:
    """Per-step metrics (metrics.jsonl) of each named training stage folder."""
    from pipeline.run_metrics import read_metrics

    return {name: read_metrics(folder) for name, folder in stages.items()}


def write_figure(path: Path, curves: dict[str, list[dict]], rows: list[dict]) -> Path:
    """Loss curves (one panel per stage, every logged loss term), question reliance over training and
    accuracy bars, as one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    panels = [name for name, records in curves.items() if records]
    cols = 3
    reliance = {name: [r for r in records if "question_reliance" in r] for name, records in curves.items()}
    reliance = {name: records for name, records in reliance.items() if records}
    extra = 1 + bool(reliance)
    n_rows = -(-(len(panels) + extra) // cols)
    fig, axes = plt.subplots(n_rows, cols, figsize=(4.6 * cols, 3.6 * n_rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, name in zip(flat, panels):
        _loss_panel(ax, name, curves[name])
    if reliance:
        _reliance_panel(flat[len(panels)], reliance)
    _accuracy_panel(flat[len(panels) + extra - 1], rows)
    for ax in flat[len(panels) + extra :]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


LOSS_TERMS = ("total", "ce", "kl", "reg_ce", "reg_kl", "student_ce", "uld")


def _loss_panel(ax, name: str, records: list[dict]) -> None:
    steps = [r["step"] for r in records]
    for term in LOSS_TERMS:
        if term in records[0] and not (term == "total" and len([t for t in LOSS_TERMS if t in records[0]]) == 2):
            ax.plot(steps, [r[term] for r in records], label=term, linewidth=1.2)
    ax.set_title(name, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _reliance_panel(ax, curves: dict[str, list[dict]]) -> None:
    """Question reliance (CE with shuffled student questions - CE with the true ones) per measured step."""
    for name, records in curves.items():
        steps = [r["step"] for r in records]
        line, = ax.plot(steps, [r["question_reliance"] for r in records], label=f"{name}: all slots", linewidth=1.2)
        ax.plot(steps, [r["question_reliance_first"] for r in records], "--", color=line.get_color(),
                label=f"{name}: first slot", linewidth=1.0)
        if all("question_reliance_later" in r for r in records):  # runs from before the per-slot split have none
            ax.plot(steps, [r["question_reliance_later"] for r in records], ":", color=line.get_color(),
                    label=f"{name}: later slots", linewidth=1.0)
    ax.axhline(0.0, color="#999999", linewidth=0.8)
    ax.set_title("question reliance (0: the student is ignored)", fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("CE(shuffled) - CE(true)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _accuracy_panel(ax, rows: list[dict]) -> None:
    names = [row["model"] for row in rows]
    values = [100 * (row["accuracy"] or 0.0) for row in rows]
    bars = ax.bar(range(len(rows)), values, color=["#777777", "#bbbbbb", "#4c72b0", "#dd8452", "#55a868"][: len(rows)])
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 1, f"{value:.1f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("easy-VQA test accuracy (%)")
    ax.set_title("accuracy", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
