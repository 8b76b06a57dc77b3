"""The generation phase of a dump: teacher-written answers, logged so that a rerun resumes.

`responses/<writer>.jsonl` holds one record per sample: {"sample_id", "response"} or
{"sample_id", "error"}. Each window of prompts is generated, appended and fsynced
before the next one starts; a line cut short by a crash is ignored on reading.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from schemas import RESPONSES_DIR
from pipeline.vlm.data import DataSample, ImageError
from pipeline.vlm.prompting import TemplateError, render
from pipeline.vlm.generation import HFGenerator, VLLMGenerator

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
        with open(self.path, "a") as f:
            if f.tell() and not self.path.read_bytes().endswith(b"\n"):
                f.write("\n")  # close a line cut short by a crash
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                self.records[record["sample_id"]] = record
            f.flush()
            os.fsync(f.fileno())


def make_generator(cfg, backend: str, model_path: str, teacher=None):
    """vLLM engine from the model folder, or HF generate on the already-loaded teacher."""
    if backend == "vllm":
        return VLLMGenerator(model_path, cfg.generation, cfg.tensor_parallel_size, cfg.trust_remote_code)
    return HFGenerator(teacher.model, teacher.processor, cfg.generation, sorted(teacher.end_of_turn), teacher.pad_id)


def generate_responses(cfg, processor, samples: list[DataSample], log: ResponseLog, generator, progress: bool) -> None:
    """Generate answers for every sample not yet in the log, a window at a time."""
    todo = [s for s in samples if log.get(s.sample_id) is None]
    if not todo:
        return
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc=f"generate ({generator.name})", unit="sample", dynamic_ncols=True)
    for start in range(0, len(todo), cfg.window):
        window = todo[start : start + cfg.window]
        records, prompts, waiting = [], [], []
        for sample in window:
            try:
                images = [spec.load() for spec in sample.images]
                text = render(processor, sample.messages, add_generation_prompt=True)
            except (ImageError, TemplateError) as err:
                stage = "image" if isinstance(err, ImageError) else "template"
                records.append({"sample_id": sample.sample_id, "error": f"{stage}: {err}"})
                continue
            prompts.append((text, images))
            waiting.append(sample.sample_id)
        for sample_id, text in zip(waiting, generator.generate(prompts) if prompts else []):
            records.append({"sample_id": sample_id, "response": text})
        log.append(records)
        if bar is not None:
            bar.update(len(window))
    if bar is not None:
        bar.close()
