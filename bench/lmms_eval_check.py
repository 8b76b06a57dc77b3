"""lmms-eval check: a model folder scored by lmms-eval, on a local task, beside `student eval`'s score.

    # 1. with the project's venv: the data as a local parquet file + an lmms-eval task that reads it (no hub)
    .venv/bin/python bench/lmms_eval_check.py export --data easy-vqa:test --limit 50 --work /tmp/lmms-work
    # 2. lmms-eval in a venv of its own (it pins wandb==0.25 and pulls ~150 packages); see README for why each pin
    python3 -m venv /tmp/lmms-venv && /tmp/lmms-venv/bin/pip install "lmms-eval==0.7.3" "transformers>=5.23" \\
        torch==2.13.0 "filelock<4" decord && /tmp/lmms-venv/bin/pip uninstall -y torchvision   # CPU machines
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled /tmp/lmms-venv/bin/python -m lmms_eval \\
        --model llava_hf --model_args pretrained=MODEL,device=cpu,device_map=cpu --tasks easyvqa_local \\
        --include_path /tmp/lmms-work/tasks --batch_size 1 --log_samples --output_path /tmp/lmms-work/lmms
    # 3. student eval on the same records, then the comparison, sample by sample
    .venv/bin/student eval --model MODEL --data easy-vqa:test --limit 50 --batch-size 1 --out /tmp/lmms-work/ours.json
    .venv/bin/python bench/lmms_eval_check.py compare --work /tmp/lmms-work --ours /tmp/lmms-work/ours.json

The task scores with our own normaliser (pipeline/vlm/answers.py, copied into the task's utils.py), so the two
scores differ only where the answers differ; `compare` lists those.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

TASK = "easyvqa_local"
TASK_YAML = """task: {task}
dataset_path: parquet
dataset_kwargs:
  data_files: {{test: {parquet}}}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
UTILS = '''"""easyvqa_local: written by bench/lmms_eval_check.py; scores as `student eval` does."""
import re
from io import BytesIO

from PIL import Image


{normalize}

def doc_to_visual(doc):
    image = doc["image"]
    return [Image.open(BytesIO(image["bytes"])).convert("RGB") if isinstance(image, dict) else image.convert("RGB")]


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {{"exact_match": float(normalize_answer(results[0]) == normalize_answer(doc["answer"]))}}
'''


def export(data: str, limit: int, work: Path, max_new_tokens: int) -> None:
    """The first `limit` records of `data` as WORK/data/test.parquet and the task under WORK/tasks."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.vlm.answers import normalize_answer
    from pipeline.vlm.data import read_samples

    rows = []
    for sample in read_samples(data):
        if len(rows) == limit:
            break
        (ref,) = sample.images
        buffer = io.BytesIO()
        ref.load().save(buffer, format="PNG")
        question = next(p["text"] for p in sample.messages[0]["content"] if p["type"] == "text")
        rows.append({"id": sample.sample_id, "question": question, "answer": sample.answer,
                     "image": {"bytes": buffer.getvalue(), "path": None}})
    (work / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), work / "data" / "test.parquet")
    tasks = work / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, parquet=(work / "data" / "test.parquet").resolve(),
                                                         max_new_tokens=max_new_tokens))
    (tasks / "utils.py").write_text(UTILS.format(normalize=inspect.getsource(normalize_answer)))
    print(f"wrote {len(rows)} records to {work / 'data' / 'test.parquet'} and the task {TASK} to {tasks}")


def compare(work: Path, ours: Path) -> dict:
    """lmms-eval's score against student eval's, and their answers side by side on the samples whose answer
    `student eval` keeps in its result (its first 20 examples)."""
    (samples,) = (work / "lmms").rglob(f"*{TASK}*.jsonl")
    theirs = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda r: r["doc_id"])
    mine = json.loads(ours.read_text())
    examples = mine["examples"]
    differ = []
    for row, example in zip(theirs, examples):
        answer = row["filtered_resps"]
        while isinstance(answer, list):
            answer = answer[0]
        if example["prediction"].strip() != answer.strip():
            differ.append({"doc_id": row["doc_id"], "lmms_eval": answer, "student_eval": example["prediction"]})
    result = {"samples": len(theirs), "lmms_eval_exact_match": sum(r["exact_match"] for r in theirs) / len(theirs),
              "student_eval_exact_match": mine["accuracy"], "answers_compared": min(len(theirs), len(examples)),
              "answers_that_differ": len(differ), "differences": differ[:10]}
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("export")
    ex.add_argument("--data", default="easy-vqa:test")
    ex.add_argument("--limit", type=int, default=50)
    ex.add_argument("--max-new-tokens", type=int, default=16)
    ex.add_argument("--work", type=Path, required=True)
    cmp = sub.add_parser("compare")
    cmp.add_argument("--work", type=Path, required=True)
    cmp.add_argument("--ours", type=Path, required=True)
    args = parser.parse_args()
    if args.command == "export":
        export(args.data, args.limit, args.work, args.max_new_tokens)
    else:
        compare(args.work, args.ours)


if __name__ == "__main__":
    main()
