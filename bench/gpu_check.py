"""GPU check: the numbers that need a real accelerator, in one run (`bash bench/gpu_check.sh [--cpu]`).

    bash bench/gpu_check.sh                 # GPU mode: ~1.5B-class teacher, ~0.4B-class student, bf16 (~5 min, H200);
                                            # then bench/scale_bench.py at full depth in bf16 (dump forward MFU)
    bash bench/gpu_check.sh --cpu           # reduced mode: tiny models on the CPU (what tests/test_gpu_check.py runs)

Rows of the one table it prints (and writes as gpu_check.json / gpu_check.md to --out, else $OUT, else
bench/results/gpu_check/):
  hf greedy vs reference loop   HFGenerator's greedy answers equal a plain argmax loop over full forwards
                                (no KV cache), fp32, on the built teacher.
  vllm vs hf greedy             VLLMGenerator's answers against HFGenerator's on the same prompts, or
                                "vllm not installed: skipped".
  dump tokens/s, dump outside-forward share, dump peak memory
                                pipeline.dump.dump_teacher with DumpConfig(dtype="bfloat16") on easy-VQA.
  stage-2 / SFT tokens/s, time ratio, training peak memory
                                student.train.train_stage, TrainConfig(precision="bf16"), a GenRecal stage 2
                                and a plain SFT stage 3 from the same student on the same cache and batches.
The script exits 1 when any row failed (a mismatch, a check that raised, a number that is not finite).
Models are built with pipeline/vlm/tiny.py (random weights, real Qwen2 / Mistral tokenizers); nothing is
downloaded.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "gpu_check"
VLLM_FIRST_TOKEN_SHARE = 0.75
ROW_NAMES = (
    "hf greedy vs reference loop", "vllm vs hf greedy", "dump tokens/s (bf16)", "dump outside-forward share",
    "dump peak memory", "stage-2 GenRecal tokens/s (bf16)", "SFT tokens/s (bf16)", "stage-2 / SFT time per token",
    "training peak memory",
)


@dataclass(frozen=True)
class Sizes:
    """Model and workload sizes of one mode."""

    teacher: dict  # text-config overrides of qwen2-vl-tiny
    student: dict  # text-config overrides of llava-tiny
    teacher_tokenizer: str  # qwen2: the real 152k Qwen2 vocabulary; tiny-bpe: ~500 tokens (fast on a CPU)
    student_tokenizer: str  # mistral: the real 32k Mistral vocabulary
    prompts: int  # greedy-equality prompts
    new_tokens: int  # greedy answer length
    dump_samples: int
    train_steps: int
    batch_size: int
    num_workers: int


MODES = {
    # Qwen2-1.5B-like layer shapes (4 of its 28 layers) -> a 1024-wide Mistral-tokenizer student.
    "gpu": Sizes(
        teacher=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=4, num_attention_heads=12,
                     num_key_value_heads=2),
        student=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4, num_attention_heads=16,
                     num_key_value_heads=8),
        teacher_tokenizer="qwen2", student_tokenizer="mistral", prompts=16, new_tokens=24, dump_samples=1024, train_steps=30, batch_size=16, num_workers=2,
    ),
    "cpu": Sizes(teacher={}, student=dict(hidden_size=64, intermediate_size=256), teacher_tokenizer="tiny-bpe",
                 student_tokenizer="tiny-bpe", prompts=3, new_tokens=6, dump_samples=12, train_steps=3, batch_size=4,
                 num_workers=0),
}


@dataclass
class Row:
    name: str
    value: float | None  # None for a skipped row
    unit: str
    status: str  # ok | fail | skipped
    detail: str = ""


@dataclass
class Context:
    device: str
    sizes: Sizes
    workdir: Path
    inject_mismatch: bool
    models: dict = field(default_factory=dict)  # "teacher" / "student" -> folder
    teacher_fp32: Any = None  # LoadedVLM of the teacher in fp32, for the greedy rows


# -- models and prompts ------------------------------------------------------------------------
def build_models(ctx: Context, student: bool) -> None:
    from pipeline.vlm.tiny import build_tiny_vlm

    ctx.models["teacher"] = build_tiny_vlm("qwen2-vl-tiny", ctx.workdir / "teacher", tokenizer=ctx.sizes.teacher_tokenizer,
                                           **ctx.sizes.teacher)
    if student:
        ctx.models["student"] = build_tiny_vlm("llava-tiny", ctx.workdir / "student", tokenizer=ctx.sizes.student_tokenizer,
                                           **ctx.sizes.student)


def greedy_prompts(processor, n: int) -> list[tuple[str, list]]:
    """The first n easy-VQA train questions as (chat-template text with generation prompt, images)."""
    from itertools import islice

    from pipeline.vlm.data import read_samples
    from pipeline.vlm.prompting import render

    return [(render(processor, s.messages, add_generation_prompt=True), [spec.load() for spec in s.images])
            for s in islice(read_samples("easy-vqa:train"), n)]


# -- greedy equality ---------------------------------------------------------------------------
@torch.inference_mode()
def reference_greedy(vlm, prompt: tuple[str, list], new_tokens: int) -> str:
    """Plain greedy decoding: a full forward over the whole sequence per token, argmax, stop at end of turn."""
    from pipeline.vlm.models import tokenizer_of

    text, images = prompt
    inputs = vlm.processor(text=[text], images=images or None, return_tensors="pt").to(vlm.device)
    ids, stops, answer = inputs.pop("input_ids"), set(vlm.end_of_turn), []
    inputs.pop("attention_mask")  # one unpadded row: all ones, rebuilt as the sequence grows
    # other per-token inputs (mm_token_type_ids) grow with a text token's 0
    per_token = [k for k, v in inputs.items() if v.dim() == 2 and v.shape == ids.shape]
    for _ in range(new_tokens):
        logits = vlm.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **inputs).logits
        token = int(logits[0, -1].float().argmax())
        if token in stops:
            break
        answer.append(token)
        ids = torch.cat([ids, ids.new_tensor([[token]])], dim=1)
        for key in per_token:
            inputs[key] = torch.cat([inputs[key], inputs[key].new_zeros((1, 1))], dim=1)
    return tokenizer_of(vlm.processor).decode(answer, skip_special_tokens=True).strip()


def hf_answers(ctx: Context, prompts: list) -> list[str]:
    from pipeline.vlm.generation import GenerationSettings, HFGenerator

    settings = GenerationSettings(max_new_tokens=ctx.sizes.new_tokens, temperature=0.0)
    return HFGenerator(ctx.teacher_fp32, settings).generate(prompts)


def check_hf_greedy(ctx: Context, prompts: list, answers: list[str]) -> Row:
    vlm = ctx.teacher_fp32
    reference = [reference_greedy(vlm, p, ctx.sizes.new_tokens) for p in prompts]
    if ctx.inject_mismatch:  # the test's proof that a mismatch fails the run
        reference[0] += " (injected mismatch)"
    same = sum(a == r for a, r in zip(answers, reference))
    bad = [i for i, (a, r) in enumerate(zip(answers, reference)) if a != r]
    detail = f"{same}/{len(prompts)} answers equal, {ctx.sizes.new_tokens} new tokens, fp32; e.g. {answers[0][:40]!r}"
    if not any(answers):  # nothing was compared: every answer ended at once
        return Row(ROW_NAMES[0], same / len(prompts), "share equal", "fail", "every answer is empty; " + detail)
    if bad:
        detail += f"; first mismatch #{bad[0]}: hf {answers[bad[0]]!r} vs reference {reference[bad[0]]!r}"
    return Row(ROW_NAMES[0], same / len(prompts), "share equal", "ok" if not bad else "fail", detail)


def first_token_agreement(tokenizer, a: list[str], b: list[str]) -> float:
    firsts = [(tokenizer.encode(x, add_special_tokens=False)[:1], tokenizer.encode(y, add_special_tokens=False)[:1])
              for x, y in zip(a, b)]
    return sum(x == y for x, y in firsts) / len(firsts)


def check_vllm(ctx: Context, prompts: list, answers: list[str]) -> Row:
    """vLLM runs in its own dtype (bf16 for this fp32 folder) against the fp32 HF answers: on random weights a
    bf16 rounding flips a near-tie among 152k logits for a few prompts, while a wrong prompt, template or image
    path flips nearly all first tokens. Pass: first tokens agree for at least VLLM_FIRST_TOKEN_SHARE."""
    if importlib.util.find_spec("vllm") is None:
        return Row(ROW_NAMES[1], None, "", "skipped", "vllm not installed: skipped")
    if not ctx.device.startswith("cuda"):
        return Row(ROW_NAMES[1], None, "", "skipped", "no GPU: skipped")
    from pipeline.vlm.generation import GenerationSettings, VLLMGenerator

    settings = GenerationSettings(max_new_tokens=ctx.sizes.new_tokens, temperature=0.0)
    got = VLLMGenerator(str(ctx.models["teacher"]), settings).generate(prompts)
    if ctx.inject_mismatch:
        got = ["injected mismatch " + text for text in got]
    same = sum(x == y for x, y in zip(got, answers)) / len(prompts)
    first = first_token_agreement(ctx.teacher_fp32.tokenizer, got, answers)
    status = "ok" if first >= VLLM_FIRST_TOKEN_SHARE else "fail"
    return Row(ROW_NAMES[1], same, "share equal", status,
               f"first token equal {first:.2f} (pass >= {VLLM_FIRST_TOKEN_SHARE}); {len(prompts)} prompts; "
               f"e.g. vllm {got[0][:30]!r} vs hf {answers[0][:30]!r}")


# -- dump and training -------------------------------------------------------------------------
def reset_peak_memory(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_memory_row(name: str, device: str) -> Row:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return Row(name, torch.cuda.max_memory_allocated() / 2**20, "MiB", "ok", "torch.cuda.max_memory_allocated")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return Row(name, rss, "MiB", "ok", "ru_maxrss: this process's high-water mark so far (CPU mode)")


def check_dump(ctx: Context) -> list[Row]:
    from pipeline.dump import dump_teacher
    from pipeline.dump_config import DumpConfig

    reset_peak_memory(ctx.device)
    cfg = DumpConfig(model=str(ctx.models["teacher"]), data="easy-vqa:train", out=str(ctx.workdir / "cache"),
                     limit=ctx.sizes.dump_samples, top_k=64, dtype="bfloat16", device=ctx.device,
                     question_features_fraction=0.25)
    stats = dump_teacher(cfg, progress=False)
    detail = (f"{stats.written} samples, {stats.tokens} tokens, forward {stats.forward_seconds:.2f} s of "
              f"{stats.feature_seconds:.2f} s feature pass")
    return [
        Row(ROW_NAMES[2], stats.tokens / stats.feature_seconds, "tokens/s", "ok", detail),
        Row(ROW_NAMES[3], stats.outside_forward_share, "share of wall", "ok", "1 - forward / feature-pass wall time"),
        peak_memory_row(ROW_NAMES[4], ctx.device),
    ]


def train_tokens_per_s(ctx: Context, stage: int) -> float:
    """Median trainer tokens/s over the steps after the first (which pays for allocation and autotuning)."""
    from student.config import TrainConfig
    from student.train import train_stage

    cfg = TrainConfig(cache=str(ctx.workdir / "cache"), student=str(ctx.models["student"]),
                      out=str(ctx.workdir / f"run-stage{stage}"), stage=stage, steps=ctx.sizes.train_steps,
                      batch_size=ctx.sizes.batch_size, num_workers=ctx.sizes.num_workers, precision="bf16",
                      device=ctx.device, from_student=True, attention_every=0, lr=1e-5, lr_end=1e-5)
    metrics = train_stage(cfg, progress=False)
    return statistics.median(m["tokens_per_s"] for m in metrics[1:])


def student_attention(ctx: Context) -> str:
    """The attention kernel the trainer's load_vlm picks for the student on this device."""
    from pipeline.vlm.models import load_vlm

    vlm = load_vlm(ctx.models["student"], device=ctx.device)
    kind = vlm.model.config._attn_implementation
    del vlm
    return kind


def check_training(ctx: Context) -> list[Row]:
    attention = student_attention(ctx)
    reset_peak_memory(ctx.device)
    genrecal = train_tokens_per_s(ctx, 2)
    sft = train_tokens_per_s(ctx, 3)
    common = f"batch {ctx.sizes.batch_size}, median of steps 2-{ctx.sizes.train_steps}, {attention} attention"
    return [
        Row(ROW_NAMES[5], genrecal, "tokens/s", "ok", f"student + Recalibrator + teacher-head losses; {common}"),
        Row(ROW_NAMES[6], sft, "tokens/s", "ok", f"student CE only; {common}"),
        Row(ROW_NAMES[7], sft / genrecal, "x", "ok", "= stage-2 step time / SFT step time on the same batches"),
        peak_memory_row(ROW_NAMES[8], ctx.device),
    ]


# -- running and reporting ---------------------------------------------------------------------
def guarded(names: tuple[str, ...], check, *args) -> list[Row]:
    """Run one check; a check that raises becomes failed rows (with the error) instead of ending the run."""
    start = time.perf_counter()
    try:
        rows = check(*args)
        print(f"gpu_check: {check.__name__} took {time.perf_counter() - start:.1f} s", file=sys.stderr)
        return rows if isinstance(rows, list) else [rows]
    except Exception as exc:  # noqa: BLE001 -- every failure must land in the table
        traceback.print_exc()
        lines = str(exc).strip().splitlines() or [""]  # a TypeError can hold a whole module repr
        message = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        return [Row(name, None, "", "fail", f"{type(exc).__name__}: {message}"[:300]) for name in names]


def mark_non_finite(rows: list[Row]) -> None:
    for row in rows:
        if row.status == "ok" and (row.value is None or not math.isfinite(row.value)):
            row.status, row.detail = "fail", f"value {row.value} is not a finite number; {row.detail}"
            row.value = None  # JSON has no NaN / infinity


def run_checks(ctx: Context, only: str | None) -> list[Row]:
    start = time.perf_counter()
    build_models(ctx, student=only in (None, "train"))
    print(f"gpu_check: models built in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    rows = []
    if only in (None, "dump", "train"):
        rows += guarded(ROW_NAMES[2:5], check_dump, ctx)
    if only in (None, "train"):
        rows += guarded(ROW_NAMES[5:9], check_training, ctx)
    if only in (None, "greedy"):
        # last: vLLM's engine reserves most of the GPU's memory for its KV cache
        rows += guarded(ROW_NAMES[:2], greedy_rows, ctx)
    order = {name: i for i, name in enumerate(ROW_NAMES)}
    return sorted(rows, key=lambda r: order[r.name])


def greedy_rows(ctx: Context) -> list[Row]:
    from pipeline.vlm.models import load_vlm

    ctx.teacher_fp32 = load_vlm(ctx.models["teacher"], dtype="float32", device=ctx.device)
    prompts = greedy_prompts(ctx.teacher_fp32.processor, ctx.sizes.prompts)
    answers = hf_answers(ctx, prompts)
    return [check_hf_greedy(ctx, prompts, answers), check_vllm(ctx, prompts, answers)]


def fmt_value(row: Row) -> str:
    if row.value is None:
        return "-"
    return f"{row.value:,.0f}" if abs(row.value) >= 100 else f"{row.value:.3f}"


def markdown(rows: list[Row], header: dict) -> str:
    lines = [f"# GPU check ({header['mode']} mode)", "",
             f"Command: `{header['command']}`  ", f"Machine: {header['machine']}  ",
             f"Took {header['seconds']:.0f} s; {'all checks passed' if header['passed'] else 'SOME CHECKS FAILED'}.",
             "", "| check | value | unit | status | detail |", "|---|---|---|---|---|"]
    lines += [f"| {r.name} | {fmt_value(r)} | {r.unit} | {r.status} | {r.detail.replace('|', '/')} |" for r in rows]
    return "\n".join(lines) + "\n"


def machine_info(device: str) -> str:
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "no GPU"
    return (f"{gpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} torch threads")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu", action="store_true", help="reduced mode: tiny models on the CPU")
    parser.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else DEFAULT_OUT,
                        help="folder for gpu_check.json and gpu_check.md (default: $OUT, else bench/results/gpu_check)")
    parser.add_argument("--only", choices=("greedy", "dump", "train"), help="run one group of rows (train needs dump)")
    parser.add_argument("--inject-mismatch", action="store_true", help="corrupt the greedy reference (test hook)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device visible; run `bash bench/gpu_check.sh --cpu` for the reduced mode")
    mode = "cpu" if args.cpu else "gpu"
    device = "cpu" if args.cpu else "cuda"
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ctx = Context(device, MODES[mode], Path(tmp), args.inject_mismatch)
        rows = run_checks(ctx, args.only)
    mark_non_finite(rows)
    passed = all(r.status != "fail" for r in rows)
    header = dict(mode=mode, command="bash bench/gpu_check.sh " + " ".join(argv), machine=machine_info(device),
                  seconds=time.perf_counter() - start, passed=passed)
    text = markdown(rows, header)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.md").write_text(text)
    (args.out / "gpu_check.json").write_text(json.dumps({**header, "rows": [asdict(r) for r in rows]}, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.path.insert(0, str(REPO_ROOT))
    sys.exit(main(sys.argv[1:]))
