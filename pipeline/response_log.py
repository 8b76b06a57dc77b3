"""The generation side of a dump: teacher-written answers, logged so that a rerun resumes.

`responses/<writer>.jsonl` holds one record per sample: {"sample_id", "response"} or
{"sample_id", "error"}. Answers are appended and fsynced a window at a time; a line cut short
by a crash is ignored on reading. With `--backend hf` the dump generates each window's missing
answers just before that window's forward pass (`log_answers`, images decoded once for both);
with vLLM every answer is written first (`generate_with_vllm`), as the engine needs the GPUs to
itself before the HF teacher is loaded.
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

from schemas import RESPONSES_DIR
from pipeline.progress import progress_bar
from pipeline.vlm.answers import answers_agree
from pipeline.vlm.data import DataSample, ImageError
from pipeline.vlm.prompting import TemplateError, render


class ResponseLog:
    """Reads every worker's log (so a rerun with another worker split finds old answers); appends to its own."""

    def __init__(self, cache_dir: str | Path, writer_id: str):
        folder = Path(cache_dir) / RESPONSES_DIR
        self.path = folder / f"{writer_id}.jsonl"
        folder.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        for log in sorted(folder.glob("*.jsonl")):
            for line in log.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # the last line of a killed run
                self.records[record["sample_id"]] = record

    def get(self, sample_id: str) -> dict | None:
        return self.records.get(sample_id)

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        with open(self.path, "a") as f:
            if f.tell() and not self.path.read_bytes().endswith(b"\n"):
                f.write("\n")  # close a line cut short by a crash
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.records[record["sample_id"]] = record
            f.flush()
            os.fsync(f.fileno())


def log_answers(generator, processor, loaded: list[tuple[DataSample, list]], log: ResponseLog) -> None:
    """Generate and log an answer for every (sample, decoded images) pair that has none yet.

    A prompt the chat template cannot render is logged as an error, so the sample is rejected
    with that reason instead of being retried."""
    records, prompts, waiting = [], [], []
    for sample, images in loaded:
        if log.get(sample.sample_id) is not None:
            continue
        try:
            prompts.append((render(processor, sample.messages, add_generation_prompt=True), images))
        except TemplateError as err:
            records.append({"sample_id": sample.sample_id, "error": f"template: {err}"})
            continue
        waiting.append(sample.sample_id)
    for sample_id, text in zip(waiting, generator.generate(prompts) if prompts else []):
        records.append({"sample_id": sample_id, "response": text})
    log.append(records)


def choose_answer(cfg, record: dict | None, reference: str | None) -> tuple[str | None, str | None]:
    """(answer, None), or (None, reason to reject), from a generated-response record."""
    if record is None:
        return None, "no generated response (the generation phase did not reach it)"
    if record.get("error"):
        return None, record["error"]
    response = record["response"]
    if not cfg.keep_if_correct or reference is None or answers_agree(response, reference):
        return response, None
    if cfg.on_incorrect == "reference":
        return reference, None
    return None, f"generated answer disagrees with the reference {reference!r}"


def generate_with_vllm(cfg, samples: list[DataSample], log: ResponseLog, progress: bool) -> float:
    """Write every missing answer with a vLLM engine, then free its GPU memory; returns the seconds spent.

    `samples` are the ones not yet committed to the cache. The engine loads only when an answer is missing.
    """
    todo = [s for s in samples if log.get(s.sample_id) is None]
    if not todo:
        return 0.0
    import torch

    from pipeline.vlm.generation import VLLMGenerator
    from pipeline.vlm.models import resolve_model
    from pipeline.vlm.processors import load_processor

    start = time.perf_counter()
    path = resolve_model(cfg.model)
    processor = load_processor(path, trust_remote_code=cfg.trust_remote_code)
    generator = VLLMGenerator(path, cfg.generation, cfg.tensor_parallel_size, cfg.trust_remote_code)
    bar = _bar(len(todo), progress)
    for first in range(0, len(todo), cfg.window):
        window = todo[first : first + cfg.window]
        loaded, errors = [], []
        for sample in window:
            try:
                loaded.append((sample, [spec.load() for spec in sample.images]))
            except ImageError as err:
                errors.append({"sample_id": sample.sample_id, "error": f"image: {err}"})
        log.append(errors)
        log_answers(generator, processor, loaded, log)
        if bar is not None:
            bar.update(len(window))
    if bar is not None:
        bar.close()
    del generator  # frees the engine's GPU memory before the HF teacher loads
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return time.perf_counter() - start


def _bar(total: int, enabled: bool):
    return progress_bar(total, "generate (vllm)", unit="sample", enabled=enabled)
