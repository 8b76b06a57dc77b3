"""Benchmark `pipeline dump-teacher` on tiny teachers on this CPU.

    . .venv/bin/activate
    python bench/dump_bench.py --quick     # ~2 min: 120 samples, one teacher size; 64 generated answers
    python bench/dump_bench.py             # ~8 min: 600 samples, two teacher sizes; 200 generated answers

Feature pass: for each teacher (Qwen2-VL family, the real 152k Qwen2 tokenizer, random weights)
it dumps easy-VQA train questions (responses from the data, top-64, bf16 features) and prints:
tokens/s through the body, the share of the feature phase's wall time spent outside the model
forward (body + head; target <= 10%), stored bytes per stored position, and the head FLOPs
saved by applying the head only at stored positions instead of at every position.

Generation: the tiny teacher writes short answers (`--responses generate --backend hf`) for the
same questions twice in one run, with `--generate-batch-size 1` and with the default, and prints
both phases' seconds side by side, the speed-up, and whether the greedy answers are identical.
Writes both tables to bench/results/dump_bench.md (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from pipeline.dump import dump_teacher
from pipeline.dump_config import DumpConfig
from pipeline.store.inspect_cache import cache_summary
from pipeline.vlm.generation import GenerationSettings
from pipeline.vlm.tiny import build_tiny_vlm

TEACHERS = {  # name -> text-config overrides of qwen2-vl-tiny
    "tiny (d=128, 4 layers)": {},
    "small (d=512, 8 layers)": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=4),
}


def run_one(name: str, overrides: dict, samples: int, workdir: Path) -> dict:
    model_dir = build_tiny_vlm("qwen2-vl-tiny", workdir / "teacher", tokenizer="qwen2", seed=0, **overrides)
    out = workdir / "cache"
    cfg = DumpConfig(model=str(model_dir), data="easy-vqa:train", out=str(out), limit=samples, top_k=64)
    t0 = time.perf_counter()
    stats = dump_teacher(cfg, progress=False)
    total = time.perf_counter() - t0
    summary = cache_summary(out)
    shard_bytes = sum(a["stored_bytes"] for a in summary["arrays"].values())
    vocab, d = summary["manifest"]["teacher"]["vocab_size"], summary["manifest"]["teacher"]["hidden_size"]
    flops_per_position = 2 * vocab * d
    saved = (stats.tokens - stats.stored_tokens) * flops_per_position
    params = sum(p.numel() for p in _params(model_dir))
    shutil.rmtree(workdir)
    return {
        "teacher": name,
        "params": params,
        "samples": stats.written,
        "tokens": stats.tokens,
        "stored": stats.stored_tokens,
        "tok/s": stats.tokens / stats.feature_seconds,
        "forward s": stats.forward_seconds,
        "phase s": stats.feature_seconds,
        "total s": total,
        "outside": stats.outside_forward_share,
        "B/stored pos": shard_bytes / stats.stored_tokens,
        "head GFLOP saved": saved / 1e9,
        "head saved %": 100 * saved / (stats.tokens * flops_per_position),
    }


DEFAULT_GENERATE_BATCH = next(f.default for f in dataclasses.fields(DumpConfig) if f.name == "generate_batch_size")
ANSWER_TOKENS = 8  # short answers, as in the demo's dump (--max-new-tokens 8)


def run_generation(samples: int, workdir: Path) -> list[dict]:
    """The same prompts answered with generate batch 1 and the default batch size, one after the other."""
    model_dir = build_tiny_vlm("qwen2-vl-tiny", workdir / "teacher", tokenizer="qwen2", seed=0)
    rows, answers = [], {}
    for batch in (1, DEFAULT_GENERATE_BATCH):
        out = workdir / f"cache-b{batch}"
        cfg = DumpConfig(model=str(model_dir), data="easy-vqa:train", out=str(out), limit=samples, top_k=64,
                         responses="generate", backend="hf", generate_batch_size=batch,
                         generation=GenerationSettings(max_new_tokens=ANSWER_TOKENS))
        stats = dump_teacher(cfg, progress=False)
        log = (out / "responses" / "w00000.jsonl").read_text().splitlines()
        answers[batch] = {r["sample_id"]: r["response"] for r in map(json.loads, log)}
        rows.append({
            "generate batch": batch,
            "answers": len(answers[batch]),
            "generation s": stats.generate_seconds,
            "answers/s": len(answers[batch]) / stats.generate_seconds,
            "features s": stats.feature_seconds,
            "total s": stats.total_seconds,
            "load avg": os.getloadavg()[0],  # other work on this machine skews the seconds
        })
    shutil.rmtree(workdir)
    for row in rows:
        row["generation speed-up"] = rows[0]["generation s"] / row["generation s"]
        row["same answers as batch 1"] = "yes" if answers[row["generate batch"]] == answers[1] else "NO"
    return rows


def _params(model_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(next(model_dir.glob("*.safetensors")))).values()


def render(rows: list[dict]) -> str:
    cols = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) and abs(v) < 10 else (f"{v:,.0f}" if isinstance(v, (int, float)) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--samples", type=int, help="Samples of the feature-pass table.")
    parser.add_argument("--generate-samples", type=int, help="Generated answers per batch size.")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "dump_bench.md"))
    args = parser.parse_args(argv)
    samples = args.samples or (120 if args.quick else 600)
    teachers = dict(list(TEACHERS.items())[:1]) if args.quick else TEACHERS
    load_before = os.getloadavg()[0]
    rows = []
    for name, overrides in teachers.items():
        rows.append(run_one(name, overrides, samples, Path(tempfile.mkdtemp(prefix="dump-bench-"))))
        print(render(rows[-1:]), flush=True)
    table = render(rows)
    generated = args.generate_samples or (64 if args.quick else 200)
    generation = render(run_generation(generated, Path(tempfile.mkdtemp(prefix="dump-bench-gen-"))))
    print("\n" + generation, flush=True)
    header = (
        "# dump-teacher benchmark (CPU, tiny random-weight Qwen2-VL teachers, real Qwen2 tokenizer)\n\n"
        f"Command: `python bench/dump_bench.py {shlex.join(argv)}`  \n"
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; data easy-vqa:train, first {samples} samples; fp32 teacher, bf16 "
        "features, top-64 fp16 log-probs. 1-minute load average "
        f"{load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (above the core count, other "
        "processes shared the cores and every second here is inflated).\n\n"
        "## Feature pass (answers from the data)\n\n"
        "- tokens: positions the body ran over (prompt incl. image tokens + answer); stored: positions with "
        "features (last prompt position + answer but its last token).\n"
        "- outside: 1 - (body + head time) / wall time of the feature phase (prepare, collate, encode, "
        "write included; model load and teacher-file saving excluded; total s includes them).\n"
        "- B/stored pos: bytes of all shard arrays per stored position (question features off).\n"
        "- head saved: FLOPs of vocab x d logits not computed at the positions that are not stored.\n\n"
    )
    gen_header = (
        "\n## Generation (--responses generate --backend hf), batch 1 vs the default batch size\n\n"
        f"The tiny d=128 teacher writes {ANSWER_TOKENS}-token greedy answers (random weights rarely end a turn "
        f"early) for the first {generated} questions, once with --generate-batch-size 1 and once with "
        f"{DEFAULT_GENERATE_BATCH}, one after the other in the same run. generation s: HF generate calls; "
        "features s: the feature pass; total s: the whole dump, model loading included; load avg: the 1-minute "
        "load average when that run ended.\n\n"
    )
    Path(args.out).write_text(header + table + "\n" + gen_header + generation + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main(sys.argv[1:])
