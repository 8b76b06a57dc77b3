"""bench/scale_bench.py's results as markdown (scale_bench.md) and JSON (scale_bench.json, the issue's schema)."""

from __future__ import annotations

import json
from pathlib import Path

STAGE2_TARGET, DUMP_TARGET = 1.3, 0.10
JSON_METHODS = ("sft", "genrecal-stage1", "genrecal-stage2", "genrecal-tokens-stage2", "kd", "uld", "vlsi-stage2")


def _f(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def main_table(rows: list[dict]) -> list[str]:
    lines = ["| row | s/step | CPU s/step | of which AdamW + clip | peak MiB | ratio to SFT | CPU ratio to SFT | "
             "its steps (s) | the SFT steps paired with them (s) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        steps = ", ".join(f"{t:.1f}" for t in r.get("steps", [])) or "mix of the two rows"
        sft_steps = ", ".join(f"{t:.1f}" for t in r.get("sft_steps", [])) or "-"
        target = ""
        if r["method"] == "genrecal-stage2" and "head_path" not in r and r.get("teacher") == "7b":
            met = max(r["ratio_to_sft"], r["cpu_ratio_to_sft"]) <= STAGE2_TARGET
            target = " (target 1.3: " + ("met" if met else "MISSED") + ")"
        lines.append(f"| {r['label']} | {_f(r['seconds'])} | {_f(r['cpu_seconds'])} | {_f(r['optimizer_seconds'])} | "
                     f"{_f(r['peak_mb'], 0)} | {_f(r['ratio_to_sft'])}{target} | {_f(r['cpu_ratio_to_sft'])} | "
                     f"{steps} | {sft_steps} |")
    return lines


def scaling_table(rows: list[dict]) -> list[str]:
    lines = ["| method | answer tokens | teacher vocab | s/step | extra s over SFT | peak MiB | ratio at this depth | "
             "CPU ratio at this depth | ratio at 24 layers (estimate) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['answer_tokens']} | {r['teacher_vocab']:,} | {_f(r['seconds'])} | "
                     f"{_f(r['extra_seconds'])} | {_f(r['peak_mb'], 0)} | {_f(r['ratio_at_depth'])} | "
                     f"{_f(r['cpu_ratio_at_depth'])} | {_f(r['ratio_full_depth_estimate'])} |")
    return lines


def dump_table(dump: dict) -> list[str]:
    lines = ["| encoding | samples | tokens | body forward tok/s | whole dump tok/s | body s | head + top-k s | "
             "encode + check s | writer s (in the loop) | other s | outside body share | outside body + head share "
             "(DumpStats) | outside body share at 28 layers (estimate) |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in dump["runs"]:
        lines.append(f"| {r['encoding']} | {r['samples']} | {r['tokens']:,} | {_f(r['forward_tokens_per_s'], 1)} | "
                     f"{_f(r['dump_tokens_per_s'], 1)} | {_f(r['body_seconds'])} | {_f(r['head_seconds'])} | "
                     f"{_f(r['encode_seconds'])} | {_f(r['writer_seconds'])} | {_f(r['other_seconds'])} | "
                     f"{_f(r['outside_forward_share'], 3)} | {_f(r['outside_share_dumpstats'], 3)} | "
                     f"{_f(r['outside_share_28_layers'], 3)} |")
    return lines


def json_report(header: dict, rows: list[dict], dump: dict | None) -> dict:
    out_rows = []
    for r in rows:
        if r["method"] not in JSON_METHODS or "head_path" in r:
            continue
        row = {"method": r["method"], "seconds_per_step": r["seconds"], "peak_mb": r["peak_mb"],
               "ratio_to_sft": r["ratio_to_sft"]}
        row.update({k: r[k] for k in ("teacher", "question_features_fraction") if k in r})
        out_rows.append(row)
    before = [{"method": r["method"], "question_features_fraction": r["question_features_fraction"],
               "seconds_per_step": r["seconds"], "ratio_to_sft": r["ratio_to_sft"]} for r in rows if "head_path" in r]
    report = {"rows": out_rows, "before_weighted_head_loss": before, "run": header}
    if dump:
        first = dump["runs"][0]
        report["dump"] = {k: first[k] for k in ("forward_tokens_per_s", "dump_tokens_per_s", "outside_forward_share")}
        report["dump"]["runs"] = dump["runs"]
    return report


def write_report(out: Path, header: dict, rows: list[dict], scaling: list[dict], dump: dict | None,
                 profiles: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Cost at real sizes (bench/scale_bench.py)", "",
        f"Command: `{header['command']}`  ", f"Commit: {header['commit']} (the code measured)  ",
        f"Machine: {header['machine']}; {header['precision']}; 1-minute load average {header['load_start']:.1f} at the "
        f"start, {header['load_end']:.1f} at the end; {header['minutes']:.0f} minutes in all.", "",
        "## Every method, one step (student at Qwen2-0.5B's text shape, "
        f"{header['layers']} layers; 1,024 prompt + 128 answer tokens, batch 1)", "",
        f"Median of {header['steps']} steps after {header['warmup']} warm-up. A step: the method's loss "
        "(student/methods.py), backward, clip, AdamW. Each step of a method is followed by an SFT step on the same "
        "batch; the ratios are the median over those pairs (wall and CPU time of this process), so that load from "
        "other processes on a shared machine falls on both sides alike. `q f`: the question-feature fraction of the dump (the "
        "regularizer runs for those samples); `q 0.05` is 0.95 x the step without + 0.05 x the step with. "
        "`before:` the head path as it was before `weighted_head_loss`, in the same run. Peak: the process's "
        "resident memory during the case (model, optimizer state, teacher head, activations).", "",
        *main_table(rows), ""]
    if scaling:
        lines += [f"## Scaling: answer length and teacher vocabulary ({header['scaling_layers']} student layers)", "",
                  "`extra s over SFT` is what the method adds to the student's own step, which does not depend on "
                  "the student's depth (the Recalibrator copies 2 layers whatever the depth; kd, uld and vlsi act at "
                  "the answer positions). The last column adds it to the 24-layer SFT step of the main table scaled "
                  "by the token count ((1,024 + answer) / 1,152): an estimate, not a measurement. Only GenRecal reads "
                  "the teacher head, so only its rows vary the teacher vocabulary (vlsi needs one tokenizer on both "
                  "sides).", "", *scaling_table(scaling), ""]
    if dump:
        lines += ["## The dump at the 7B class's width", "", dump["description"], "", *dump_table(dump), ""]
    if profiles:
        lines += ["## Profiles of the rows over the target", ""]
        for label, table in profiles.items():
            lines += [f"### {label}", "", "```", table.rstrip(), "```", ""]
    (out / "scale_bench.md").write_text("\n".join(lines) + "\n")
    (out / "scale_bench.json").write_text(json.dumps(json_report(header, rows, dump), indent=1) + "\n")
    print("\n".join(lines))
