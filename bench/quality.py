"""Does the student learn from the teacher? Distillation quality on easy-VQA, shaped like the paper.

    OMP_NUM_THREADS=1 .venv/bin/python bench/quality.py --work /work/scratch/quality --jobs 2   # the full run
    .venv/bin/python bench/quality.py --work /tmp/quality-smoke --smoke                          # a few minutes

Splits of easy-VQA (records whose image also appears in an earlier split are dropped, so no image is shared):
- teacher:      train records 0..19999, labelled (bench/teacher_recipe.py, the TEACHER_CHAIN recipes);
- base student: train records 20000..21999, labelled: vision pretraining on their images
                (`pipeline pretrain-vision`), then SFT; afterwards its vision encoder stays frozen;
- pool:         train records 22000..29999, answered by the teacher (`--responses generate`), labels unused;
- held-out:     train records 30000..30499 (the curves; every setting here was fixed on these or up front);
- test:         easy-vqa:test, first --test questions: the final table only.

Every variant starts from the same base student and makes the same number of student updates
(GenRecal: stage 2 + stage 3 steps, after a stage 1 that trains the Recalibrator only):
sft, genrecal, genrecal-old-layout, genrecal-noreg, genrecal-klonly, genrecal-topk, uld (student train --method uld).
Regimes: the full pool and a low-data one (--low-fraction of it, one fixed subset). The first seed's runs
record held-out curves. Every finished piece is reused on a rerun (the teacher, the base, the cache, each run).
Results: bench/results/quality.md, quality.json, quality.png (bench/quality_report.py writes them).

The same-tokenizer pair (the same teacher and pool, a smaller Qwen2-tokenizer student; variants sft, kd, vlsi,
genrecal) is bench/quality_same_tokenizer.py; `--pairs cross same` (the default) runs both, `--pairs same` only it.

This file is the command only. Its pieces, each importing only those before it: bench/quality_runs.py (settings,
teacher, base student, cache, scores, one variant's run), quality_tables.py (a pair's tables),
quality_same_tokenizer.py (the second pair), quality_report.py (the report of both).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts below, also when imported

import quality_report  # noqa: E402
import quality_same_tokenizer  # noqa: E402
from quality_runs import (  # noqa: E402
    FOLLOW_UPS,
    SAME_TOKENIZER_ONLY,
    SMOKE,
    VARIANTS,
    Settings,
    base_student,
    pool_cache,
    regime_ids,
    run_variant,
    teacher,
)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("runs/quality"), help="Scratch folder (reused on rerun).")
    parser.add_argument("--smoke", action="store_true", help="Tiny settings: checks the bench end to end.")
    parser.add_argument("--jobs", type=int, default=1, help="Variant runs in parallel (one thread each).")
    parser.add_argument("--pairs", nargs="+", default=["cross", "same"], choices=["cross", "same"],
                        help="cross: the demo student (Mistral tokenizer); same: a smaller Qwen2-tokenizer student "
                             "(bench/quality_same_tokenizer.py).")
    parser.add_argument("--variants", nargs="+", default=None,
                        choices=list(VARIANTS) + list(FOLLOW_UPS) + list(SAME_TOKENIZER_ONLY),
                        help="Default: each pair's own list; otherwise each pair runs the ones it has.")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="Override the settings' seeds.")
    parser.add_argument("--regimes", nargs="+", default=["full", "low"], choices=["full", "low"])
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    s = SMOKE if args.smoke else Settings()
    seeds = tuple(args.seeds) if args.seeds else s.seeds
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (work / "settings.json").write_text(json.dumps(asdict(s), indent=2))
    started = time.perf_counter()
    teacher_folder = teacher(work, s)
    jobs = []  # run_variant's arguments after `s`
    if "cross" in args.pairs:
        base, cache = base_student(work, s), pool_cache(work, s, teacher_folder)
        ids = {"full": None, "low": regime_ids(cache, s.low_fraction)}
        variants = [v for v in args.variants or VARIANTS if v in VARIANTS or v in FOLLOW_UPS]
        jobs += [(str(work / "runs"), str(cache), str(base), regime, seed, variant, ids[regime], "cross-tokenizer")
                 for regime in args.regimes for seed in seeds for variant in variants]
    if "same" in args.pairs:
        jobs += quality_same_tokenizer.jobs(work, s, teacher_folder, args.variants, args.regimes, seeds)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_variant, job[0], s, *job[1:]) for job in jobs]
        for f in futures:
            f.result()
    # the report covers every finished run in WORK (an earlier full run plus any follow-up variants), both pairs
    quality_report.write(work, s, teacher_folder, args.results, time.perf_counter() - started,
                         "python bench/quality.py " + " ".join(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    main()
