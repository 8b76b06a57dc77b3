"""Benchmark `pipeline dump-teacher` on tiny teachers on this CPU.

    . .venv/bin/activate
    python bench/dump_bench.py --quick     # ~2 min: 120 samples, one teacher size; 64 generated answers
    python bench/dump_bench.py             # ~8 min: 600 samples, two teacher sizes; 200 generated answers
    python bench/dump_bench.py --real-width 2 --samples 8   # the 7B class's width, 2 layers (bench/scale_bench.py)

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


# -- the dump at a real width (bench/scale_bench.py's dump table) -------------------------------------------------
# Qwen2-VL-7B's text width and vocabulary (hidden 3,584, MLP 18,944, 28 heads, 4 KV heads, vocab 152,064); its
# depth (28 layers) is cut to a few: the outside-forward share is then an upper bound, and scaled to 28 layers too
REAL_WIDTH = dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                  vocab_size=152064, max_position_embeddings=32768)
REAL_LAYERS = 28
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16 FLOP/s, for MFU


def real_width(work: Path, layers: int = 2, samples: int = 8, device: str = "cpu", fraction: float = 0.25,
               encodings: tuple[str, ...] = ("bf16", "fp8_e4m3")) -> dict:
    """Dump `samples` samples of 1,024 prompt + 128 answer tokens (answers from the data) with a teacher of the 7B
    class's width and vocabulary and `layers` decoder layers, once per feature encoding: top-64, question features
    for `fraction` of the samples. Where the feature pass's wall time goes, per run."""
    from pipeline.vlm.tiny import build_tiny_vlm
    from scale_setup import IMAGE_SIZE, VISION

    teacher = work / f"teacher-7b-width-{layers}L"
    if not (teacher / "config.json").exists():
        build_tiny_vlm("qwen2-vl-tiny", teacher, tokenizer="qwen2", seed=0, vision_config=VISION, image_size=IMAGE_SIZE,
                       num_hidden_layers=layers, **REAL_WIDTH)
    data = _sized_data(work / "dump-data", teacher, samples)
    runs = [_timed_dump(teacher, data, work / f"dump-{encoding}", encoding, fraction, device, layers)
            for encoding in encodings]
    description = (
        f"Teacher: Qwen2-VL at the 7B class's width and vocabulary (hidden 3,584, MLP 18,944, 28 heads, 4 KV heads, "
        f"vocab 152,064) with {layers} of its 28 decoder layers, random weights, {runs[0]['dtype']} on {device}; "
        f"{samples} samples of 1,024 prompt tokens (256 image tokens) + 128 answer tokens from a LLaVA JSON file "
        f"(`--responses dataset`), top-64, question features for a fraction {fraction} of the samples "
        f"({runs[0]['question_samples']} here). body: the decoder forward; head + top-k: pipeline/feature_pass.py "
        "head_statistics; encode + check: `roundtrip` (encode, decode, the lossy bound); writer: CacheWriter calls on "
        "the loop's thread (a shard's compression and commit run in its background thread, overlapping the forward, "
        "and the last one is waited for inside the measured time); other: the rest (images, processor, collate). "
        "`outside body share` = 1 - body / feature-pass wall time (the issue's definition: head, top-k, encoding, "
        "writer all count as outside); DumpStats' own share counts the head as forward. At 28 layers: the body time "
        "scaled by 28 / layers, everything else as measured (an estimate). MFU: forward FLOPs (2 x decoder "
        "parameters per token + attention + the head at stored positions) over the body + head time, against the "
        "GPU's dense bf16 peak (none on a CPU).")
    return {"description": description, "runs": runs}


def _sized_data(folder: Path, teacher: Path, samples: int) -> Path:
    """A LLaVA JSON file of `samples` records whose prompts are 1,024 tokens and answers 128 in the teacher's
    processor and chat template (images under `folder`)."""
    from pipeline.vlm.models import end_of_turn_ids, tokenizer_of
    from pipeline.vlm.processors import load_processor
    from scale_setup import Shapes, noise_image, sized_sample

    folder.mkdir(parents=True, exist_ok=True)
    processor = load_processor(teacher)
    eot = end_of_turn_ids(tokenizer_of(processor), processor.chat_template)
    records = []
    for i in range(samples):
        _, question, answer = sized_sample(processor, eot, Shapes(), f"s{i}", offset=i)
        noise_image(i).save(folder / f"img{i}.png")
        records.append({"id": f"s{i}", "image": f"img{i}.png", "conversations": [
            {"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": answer}]})
    path = folder / "data.json"
    path.write_text(json.dumps(records))
    return path


class _PartTimer:
    """Wall seconds spent in some functions on the calling thread, by part; a call inside a timed call of the same
    part (CacheWriter.add -> flush -> wait) counts once."""

    def __init__(self):
        self.seconds, self._depth = {}, {}

    def wrap(self, part: str, fn):
        def timed(*args, **kwargs):
            self._depth[part] = self._depth.get(part, 0) + 1
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth[part] -= 1
                if not self._depth[part]:
                    self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start
        return timed


def _timed_dump(teacher: Path, data: Path, out: Path, encoding: str, fraction: float, device: str, layers: int) -> dict:
    import pipeline.feature_pass as feature_pass
    from pipeline.feature_pass import wants_question_features
    from pipeline.store.writer import CacheWriter

    shutil.rmtree(out, ignore_errors=True)
    timer, patched = _PartTimer(), []
    for owner, name, part in ((feature_pass, "roundtrip", "encode"), (feature_pass, "head_statistics", "head"),
                              (CacheWriter, "add", "writer"), (CacheWriter, "flush", "writer"),
                              (CacheWriter, "wait", "writer")):
        patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, timer.wrap(part, getattr(owner, name)))
    try:
        cfg = DumpConfig(model=str(teacher), data=str(data), image_root=str(data.parent), out=str(out), top_k=64,
                         feature_encoding=encoding, question_features_fraction=fraction, device=device)
        stats = dump_teacher(cfg, progress=False)
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)
    head = timer.seconds.get("head", 0.0)
    body = stats.forward_seconds - head
    parts = {f"{k}_seconds": timer.seconds.get(k, 0.0) for k in ("encode", "writer")}
    outside = stats.feature_seconds - body
    body_28 = body * REAL_LAYERS / layers
    flops = _forward_flops(stats, layers)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else ""
    peak = next((v for k, v in PEAK_BF16.items() if k in gpu), None)
    achieved = flops / stats.forward_seconds
    return {"encoding": encoding, "dtype": "bf16" if device.startswith("cuda") else "fp32", "samples": stats.written,
            "question_samples": sum(wants_question_features(f"s{i}", fraction) for i in range(stats.written)),
            "tokens": stats.tokens, "stored": stats.stored_tokens, "forward_tokens_per_s": stats.tokens / body,
            "dump_tokens_per_s": stats.tokens / stats.feature_seconds, "feature_seconds": stats.feature_seconds,
            "total_seconds": stats.total_seconds, "body_seconds": body, "head_seconds": head, **parts,
            "other_seconds": outside - head - parts["encode_seconds"] - parts["writer_seconds"],
            "outside_forward_share": outside / stats.feature_seconds,
            "outside_share_dumpstats": stats.outside_forward_share,
            "outside_share_28_layers": outside / (outside + body_28),
            "forward_tflops": achieved / 1e12, "mfu": None if peak is None else achieved / peak}


def _forward_flops(stats, layers: int) -> float:
    """FLOPs of the feature pass's forward: 2 x decoder parameters per token, attention (2 d n^2 per layer for a
    causal sequence of n), the head at the stored positions. Every sample has the same length here."""
    d, ff, kv = REAL_WIDTH["hidden_size"], REAL_WIDTH["intermediate_size"], REAL_WIDTH["num_key_value_heads"]
    kv_dim = kv * d // REAL_WIDTH["num_attention_heads"]
    per_layer = 2 * d * d + 2 * d * kv_dim + 3 * d * ff
    n = stats.tokens / max(stats.written, 1)
    return (2 * per_layer * layers * stats.tokens + 2 * d * n * n * layers * stats.written
            + 2 * REAL_WIDTH["vocab_size"] * d * stats.stored_tokens)


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
    parser.add_argument("--real-width", type=int, metavar="LAYERS",
                        help="only the dump at the 7B class's width with this many layers, printed (bench/scale_bench.py "
                             "writes it to its results)")
    args = parser.parse_args(argv)
    if args.real_width:
        from scale_report import dump_table

        dump = real_width(Path(tempfile.mkdtemp(prefix="dump-real-width-")), layers=args.real_width,
                          samples=args.samples or 8)
        print(dump["description"] + "\n\n" + "\n".join(dump_table(dump)))
        return
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
