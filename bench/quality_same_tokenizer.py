"""The same-tokenizer section of bench/quality.py: its teacher distilled into a smaller student with its tokenizer.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality.py --work /work/scratch/quality --jobs 2 --pairs same  # this pair
    nice -n 19 .venv/bin/python bench/quality.py --work /tmp/quality-smoke-same --smoke --pairs same        # smoke
    .venv/bin/python bench/quality.py --work W    # both pairs (the default --pairs cross same)

The first line reuses the teacher a cross-tokenizer run left in that folder (run it once that run has finished: the
two would share the 2 cores and the report); the report then covers both pairs.

The pair: bench/quality.py's teacher (the TEACHER_CHAIN of bench/teacher_recipe.py: the demo teacher, a tiny
Qwen2-VL with the real Qwen2 tokenizer, 152k vocabulary, hidden 128, 4 decoder layers) and STUDENT below, a tiny
Qwen2-VL with the same tokenizer, narrower and shallower: text side hidden 64, 3 decoder layers, FFN 256, 4 heads
(2 KV), tied embeddings; the family's default vision tower (2 blocks, 64 wide) at the cross-tokenizer student's
56-pixel input. Everything else is the cross-tokenizer table's protocol (bench/quality.py's docstring):
- base: the same recipe (`base_student`: vision pretraining, then SFT, on the labelled slice) -> WORK/same/base;
- cache: the same pool, dumped again with `dump-teacher --layers 1,2,3` (every intermediate layer of the
  4-layer teacher; layer l is output_hidden_states[l]) -> WORK/same/cache; the same settings and greedy answers;
- variants (VARIANTS), all from the same base and with stage 2 + 3 student updates:
  sft (`--stage 3 --from-student`), kd (`--method kd --stage 2`: CE + KL to the cached top-k + tail),
  vlsi (`--method vlsi --stage 1|2|3`: stage 1 trains the verbalizers only, like GenRecal's stage 1 trains
  the Recalibrator only; student layers 1,2 by default, matched in a window of 2), genrecal (stages 1-3);
- the same seeds, regimes (the low regime's subset is drawn the same way from this cache's sample ids), curves
  on the held-out records for the first seed, test only in the final table;
- rows in quality.json carry "pair": "same-tokenizer"; quality.md gets this pair's tables after the other's.
Every finished piece (teacher, base, cache, run) is reused on rerun.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts below, also when imported

from quality_runs import base_student, pool_cache, regime_ids  # noqa: E402
from quality_tables import curves, pair_tables, reference_models, reliance  # noqa: E402

PAIR, FOLDER = "same-tokenizer", "same"
STUDENT = {"family": "qwen2-vl-tiny", "tokenizer": "qwen2", "hidden_size": 64, "num_hidden_layers": 3,
           "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "image_size": 56,
           "tie_word_embeddings": True}
TEACHER_LAYERS = (1, 2, 3)
VARIANTS = ("sft", "kd", "vlsi", "genrecal")


def build_student(out: Path) -> Path:
    from pipeline.vlm.tiny import build_tiny_vlm

    config = dict(STUDENT)
    return build_tiny_vlm(config.pop("family"), out, tokenizer=config.pop("tokenizer"), seed=0, **config)


def jobs(work: Path, s, teacher_folder: Path, variants, regimes, seeds) -> list[tuple]:
    """Builds (or reuses) this pair's base and cache; returns quality_runs.run_variant's arguments (after `s`), one
    tuple per run."""
    base = base_student(work, s, work / FOLDER / "base", build_student)
    cache = pool_cache(work, s, teacher_folder, work / FOLDER / "cache", TEACHER_LAYERS)
    ids = {"full": None, "low": regime_ids(cache, s.low_fraction)}
    chosen = [v for v in variants or VARIANTS if v in VARIANTS]
    return [(str(work / FOLDER / "runs"), str(cache), str(base), regime, seed, variant, ids[regime], PAIR)
            for regime in regimes for seed in seeds for variant in chosen]


def finished(work: Path) -> bool:
    from student.checkpoint import FINISHED_FILE

    return (work / FOLDER / "base" / "stage3" / FINISHED_FILE).exists() and (work / FOLDER / "cache.done.json").exists()


def parameters(folder: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        total = 0
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


def _tail(records: list[dict], key: str, n: int = 4) -> float | None:
    values = [r[key] for r in records if key in r][-n:]
    return statistics.mean(values) if values else None


def vlsi_diagnostics(runs: Path, seed: int) -> dict:
    """regime -> the first seed's VLsI stage-1 verbalizer CEs, stage-2 losses and matched teacher layer per student
    layer (mean of the last 4 logged values)."""
    out = {}
    for run in sorted(runs.glob(f"*/vlsi/seed{seed}")):
        read = lambda st: [json.loads(line) for line in (run / st / "metrics.jsonl").read_text().splitlines()] \
            if (run / st / "metrics.jsonl").exists() else []  # noqa: E731
        one, two = read("stage1"), read("stage2")
        matches = sorted({k for r in two for k in r if k.startswith("match_s")}, key=lambda k: int(k[7:]))
        out[run.parts[-3]] = {**{k: _tail(one, k) for k in ("teacher_verbalizer_ce", "student_verbalizer_ce")},
                              **{k: _tail(two, k) for k in ("layer_kl", "last_kl", "student_ce")},
                              "matches": {k[6:]: _tail(two, k) for k in matches}}
    return out


def section(work: Path, s, teacher_folder: Path, command: str, seconds: float) -> dict:
    """This pair's part of quality.json (its rows and summary go with the other pair's, marked by "pair")."""
    from pipeline.store.reader import CacheReader

    root = work / FOLDER
    base, cache = root / "base" / "stage3", root / "cache"
    first = root / "first_run.json"
    if first.exists():
        seconds, command = (json.loads(first.read_text())[k] for k in ("seconds", "command"))
    else:
        first.write_text(json.dumps({"seconds": seconds, "command": command}))
    refs = reference_models(work, s, teacher_folder, base, root / "reference")
    low = regime_ids(cache, s.low_fraction)
    return {"student": STUDENT, "student_parameters": parameters(base),
            "teacher_parameters": parameters(teacher_folder),
            "teacher_layers": list(TEACHER_LAYERS), "references": refs,
            "curves": curves(root / "runs", s.seeds[0]),
            "reliance": reliance(root / "runs", s.seeds[0]),
            "vlsi": vlsi_diagnostics(root / "runs", s.seeds[0]), "pool_size": len(CacheReader(cache).sample_ids),
            "low_size": len(low) if low else None, "seconds": seconds, "command": command}


def _num(value) -> str:
    return "" if value is None else f"{value:.3f}"


def markdown(doc: dict) -> list[str]:
    sec, s = doc["same_tokenizer"], doc["settings"]
    st = sec["student"]
    lines = ["", "## Same-tokenizer pair (bench/quality_same_tokenizer.py)", "",
             f"Command: `{sec['command']}` (the run that first wrote this section; {sec['seconds'] / 60:.0f} min wall "
             "on this 2-core machine, with whatever else that run did).", "",
             f"The same teacher ({sec['teacher_parameters'] / 1e6:.1f}M parameters) and pool, distilled into a tiny "
             f"Qwen2-VL with the same Qwen2 tokenizer ({sec['student_parameters'] / 1e6:.1f}M parameters, most of them "
             f"the tied 152k x {st['hidden_size']} embedding): hidden {st['hidden_size']}, {st['num_hidden_layers']} "
             f"decoder layers, FFN {st['intermediate_size']}, {st['image_size']}-pixel input. Its base is made as the "
             f"other pair's; the cache is the pool dumped again with `--layers "
             f"{','.join(map(str, sec['teacher_layers']))}` ({sec['pool_size']} kept; low regime: {sec['low_size']}). "
             f"sft, kd: {sum(s['stage_steps'][1:])} updates; vlsi, genrecal: stage 1 {s['stage_steps'][0]} steps "
             f"(verbalizers / Recalibrator only), stage 2 {s['stage_steps'][1]}, stage 3 {s['stage_steps'][2]}.", ""]
    def order(r):
        return r["regime"] != "full", VARIANTS.index(r["variant"]) if r["variant"] in VARIANTS else len(VARIANTS)

    lines += pair_tables(sec, sorted((r for r in doc["summary"] if r["pair"] == PAIR), key=order), s,
                                        ("teacher", "base_student"))
    lines += ["", f"VLsI, seed {s['seeds'][0]} (mean of the last 4 logged values): stage-1 verbalizer CE per side, "
              "stage-2 losses, and the teacher layer each student layer matched:", "",
              "| regime | teacher verbalizer CE | student verbalizer CE | layer KL | last KL | student CE | matches |",
              "|---|---|---|---|---|---|---|"]
    for regime, d in sec["vlsi"].items():
        matches = ", ".join(f"{k} -> {v:.2f}" for k, v in d["matches"].items() if v is not None)
        keys = ("teacher_verbalizer_ce", "student_verbalizer_ce", "layer_kl", "last_kl", "student_ce")
        lines.append(f"| {regime} | " + " | ".join(_num(d[k]) for k in keys) + f" | {matches} |")
    return lines
