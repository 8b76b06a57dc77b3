"""Evaluate any stock HF VLM folder (teacher, student, any stage) on a data source the dump reads.

    student eval --model runs/a/stage3 --data easy-vqa:test                 # -> runs/a/stage3/eval/easy-vqa-test.json
    student eval --model runs/a/stage3 --data easy-vqa:test --limit 200     # -> .../eval/easy-vqa-test-limit200.json

    from pipeline.vlm.evaluate import evaluate
    result = evaluate("runs/a/stage3", "easy-vqa:test", limit=200, progress=False)
    result["accuracy"], result["per_type"]["shape"]["accuracy"]

Greedy decoding through `pipeline.vlm.generation.HFGenerator` (several prompts per `model.generate`
call, left padding, answers cut at the chat template's end-of-turn ids). A prediction is right when it equals the answer after
`pipeline.vlm.answers.normalize_answer` (lower case, punctuation and articles dropped, spaces collapsed); a
scenes record (`scenes:test`) is scored against its ground truth (`pipeline.vlm.scenes.score_answer`: object F1
for descriptions, the parsed value for the rest). Samples with a `meta["question_type"]` (easy-vqa: shape, color,
yes/no; scenes: describe, count, attribute, relation) are also scored per type; `score` is the mean over types. Malformed records
(BadSample), images that fail to load and prompts the chat template cannot render are skipped and
counted under "skipped".
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Protocol

from pipeline.progress import progress_bar
from pipeline.vlm.answers import is_match
from pipeline.vlm.data import BadSample, DataSample, read_samples
from pipeline.store.fsutil import write_atomic
from pipeline.vlm.generation import Failed, GenerationSettings, HFGenerator
from pipeline.vlm.images import ImageError
from pipeline.vlm.scenes import score_answer
from pipeline.vlm.models import load_vlm, pick_device
from pipeline.vlm.prompting import TemplateError, render

__all__ = ["GreedyPredictor", "Pending", "data_slug", "default_output", "evaluate", "score"]

N_EXAMPLES = 20
N_SKIP_REASONS = 20


def data_slug(data: str, limit: int | None = None) -> str:
    """File-name form of a data source: 'easy-vqa:test' -> 'easy-vqa-test' ('-limit50' with a limit)."""
    name = Path(data).name if ("/" in data or "\\" in data) and not data.startswith("easy-vqa") else data
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "data"
    return f"{slug}-limit{limit}" if limit is not None else slug


@dataclass
class Pending:
    """A sample ready to predict: its chat-template prompt and loaded images."""

    sample: DataSample
    prompt: str
    images: list


class Predictor(Protocol):
    def prompt(self, sample: DataSample) -> str: ...

    def __call__(self, batch: list[Pending]) -> list[str]: ...


class GreedyPredictor:
    """Greedy answers from a loaded VLM (`pipeline.vlm.models.LoadedVLM`) through the project's one batched
    HF generator (`pipeline.vlm.generation.HFGenerator`: left padding, cut at the end-of-turn ids)."""

    def __init__(self, vlm, max_new_tokens: int = 16, batch_size: int = 16):
        self.vlm = vlm
        self.generator = HFGenerator(vlm, GenerationSettings(max_new_tokens=max_new_tokens), batch_size)

    def prompt(self, sample: DataSample) -> str:
        return render(self.vlm.processor, sample.messages, add_generation_prompt=True)

    def __call__(self, batch: list[Pending]) -> list[str]:
        return self.generator.generate([(p.prompt, p.images) for p in batch])


class _Tally:
    """Running counts: overall, per question type, skips and the first examples. A sample's score is 1/0 exact
    match, or for scenes records (meta["scene"]) `pipeline.vlm.scenes.score_answer` (object F1 for descriptions)."""

    def __init__(self):
        self.total = self.correct = 0
        self.score_sum = 0.0
        self.types: dict[str, list] = {}  # type -> [samples, correct, score sum]
        self.skipped: list[dict] = []
        self.examples: list[dict] = []

    def skip(self, sample_id: str, reason: str) -> None:
        self.skipped.append({"id": sample_id, "reason": reason})

    def add(self, sample: DataSample, prediction: str) -> None:
        value = sample_score(sample, prediction)
        right = value == 1.0
        self.total += 1
        self.correct += right
        self.score_sum += value
        kind = sample.meta.get("question_type")
        if kind is not None:
            counts = self.types.setdefault(str(kind), [0, 0, 0.0])
            counts[0] += 1
            counts[1] += right
            counts[2] += value
        if len(self.examples) < N_EXAMPLES:
            self.examples.append({"id": sample.sample_id, "question": question_text(sample), "answer": sample.answer,
                                  "prediction": prediction, "correct": right, "score": value, "question_type": kind})

    def result(self) -> dict:
        per_type = {k: {"samples": n, "correct": c, "accuracy": _ratio(c, n), "score": _ratio(total, n)}
                    for k, (n, c, total) in sorted(self.types.items())}
        scores = [t["score"] for t in per_type.values()]
        return {
            "samples": self.total, "correct": self.correct, "accuracy": _ratio(self.correct, self.total),
            "score": sum(scores) / len(scores) if scores else _ratio(self.score_sum, self.total),
            "per_type": per_type,
            "skipped": len(self.skipped), "skipped_examples": self.skipped[:N_SKIP_REASONS], "examples": self.examples,
        }


def sample_score(sample: DataSample, prediction: str) -> float:
    """1.0 / 0.0 exact match after normalising; a scenes record is scored against its ground truth instead."""
    if "scene" in sample.meta:
        return score_answer(prediction, sample.meta)
    return float(is_match(prediction, sample.answer or ""))


def _ratio(num: float, den: int) -> float | None:
    return num / den if den else None


def question_text(sample: DataSample) -> str:
    """Text of the last user turn (the question)."""
    user = next((m for m in reversed(sample.messages) if m.get("role") == "user"), {"content": []})
    content = user["content"]
    if isinstance(content, str):
        return content
    return " ".join(p.get("text", "") for p in content if p.get("type") == "text").strip()


def _prepare(items: Iterable[DataSample | BadSample], predictor: Predictor, tally: _Tally) -> Iterator[Pending]:
    """Pending samples; bad records, images that fail to load and unrenderable prompts go to the tally."""
    for item in items:
        if isinstance(item, BadSample):
            tally.skip(item.sample_id, f"{item.stage}: {item.reason}")
            continue
        try:
            images = [spec.load() for spec in item.images]
            yield Pending(item, predictor.prompt(item), images)
        except (ImageError, TemplateError) as err:
            tally.skip(item.sample_id, str(err))


def _batches(pending: Iterator[Pending], size: int) -> Iterator[list[Pending]]:
    batch: list[Pending] = []
    for p in pending:
        batch.append(p)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def score(items: Iterable[DataSample | BadSample], predictor: Predictor, batch_size: int = 16, bar=None) -> dict:
    """Predict and count: {"samples", "correct", "accuracy", "per_type", "skipped", "examples", ...}."""
    tally = _Tally()
    for batch in _batches(_prepare(items, predictor, tally), max(1, batch_size)):
        predictions = predictor(batch)
        if len(predictions) != len(batch):
            raise RuntimeError(f"predictor returned {len(predictions)} answers for {len(batch)} prompts")
        for p, prediction in zip(batch, predictions):
            if isinstance(prediction, Failed):
                tally.skip(p.sample.sample_id, f"generation failed: {prediction.reason}")
            else:
                tally.add(p.sample, prediction)
        if bar is not None:
            bar.update(len(batch))
            bar.set_postfix(acc=f"{tally.correct / max(tally.total, 1):.3f}", refresh=False)
    return tally.result()


def _limited(items: Iterable, limit: int | None, skip: int = 0) -> Iterator:
    import itertools

    return itertools.islice(items, skip, None if limit is None else skip + limit)


def _progress_bar(enabled: bool, total: int | None, desc: str):
    return progress_bar(total, desc, unit="sample", enabled=enabled)


def default_output(model: str, data: str, limit: int | None = None, skip: int = 0) -> Path:
    """`<model folder>/eval/<data slug>.json`; for an alias or hub id, `eval/<model slug>/<data slug>.json` here."""
    folder = Path(model).expanduser()
    base = folder / "eval" if folder.is_dir() else Path("eval") / data_slug(str(model).replace("/", "--"))
    return base / f"{data_slug(data, limit)}{f'-from{skip}' if skip else ''}.json"


def evaluate(model: str, data: str, image_root: str | None = None, limit: int | None = None, batch_size: int = 16,
             max_new_tokens: int = 16, out: str | None = None, device: str = "auto", progress: bool = True,
             predictor: Predictor | None = None, skip: int = 0) -> dict:
    """Evaluate the VLM in folder `model` on `data` (see `pipeline.vlm.data.read_samples`); write and return the result.

    The JSON goes to `out`, default `<model>/eval/<data_slug(data, limit)>.json`. `limit`: only the first
    `limit` records of the source (skipped ones included); `skip`: start after the first `skip` records
    (e.g. a held-out slice of a training split, for choices that must not look at the test split). `predictor`: a stand-in for the model (tests);
    when given, no model is loaded. Raises ModelLoadError / DataError (ValueErrors) when the model or data
    cannot be read at all."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    items = read_samples(data, image_root)  # DataError now for a missing / unreadable source
    if predictor is None:
        predictor = GreedyPredictor(load_vlm(model, device=pick_device(device)), max_new_tokens, batch_size)
    start = time.perf_counter()
    bar = _progress_bar(progress, limit, f"eval {data_slug(data)}")
    try:
        counts = score(_limited(items, limit, skip), predictor, batch_size, bar)
    finally:
        if bar is not None:
            bar.close()
    path = Path(out) if out else default_output(model, data, limit, skip)
    result = {"model": str(model), "data": data, "limit": limit, "skip": skip, **counts,
              "seconds": round(time.perf_counter() - start, 3), "batch_size": batch_size,
              "max_new_tokens": max_new_tokens, "output": str(path)}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(result, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return result
