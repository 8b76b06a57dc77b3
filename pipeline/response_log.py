"""The generation side of a dump: teacher-written answers, logged so that a rerun resumes.

`responses/<writer>.jsonl` holds one record per sample: {"sample_id", "response"} or
{"sample_id", "error", "stage"} (the sample is rejected at that stage). Answers are appended and
fsynced a window at a time; a line cut short by a crash is ignored on reading. With `--backend hf`
the dump generates each window's missing answers just before that window's forward pass
(`log_answers`, images decoded once for both); with vLLM every answer is written first
(`generate_with_vllm`), in a child process that has its own GPU(s) and gives all their memory back
when it exits, before the HF teacher is loaded.

Before a prompt reaches either generator it is checked (`log_answers`): a prompt that leaves no room
for an answer within --max-length is logged as a "length" error, so one sample can never fail a
whole vLLM `generate` call; samples over --max-images never get this far (pipeline/dump.py).
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from schemas import RESPONSES_DIR
from pipeline.store.backend import open_storage, storage_options_env
from schemas.dataclass_io import from_dict, to_dict
from pipeline.progress import progress_bar
from pipeline.vlm.answers import answers_agree
from pipeline.vlm.data import DataSample, ImageError
from pipeline.vlm.generation import Failed, batched_images
from pipeline.vlm.prompting import TemplateError, render

# The class the vLLM child builds its generator from ("module:attribute"); tests name a stand-in here.
VLLM_GENERATOR = "pipeline.vlm.generation:VLLMGenerator"

# torchrun's per-worker variables: the vLLM child is a plain single process of its own (vLLM reads RANK,
# LOCAL_RANK and MASTER_PORT to set up its own process group), on the GPUs CUDA_VISIBLE_DEVICES gives it.
TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")


class GenerationPhaseError(RuntimeError):
    """The vLLM child process failed; its own error is above in the output."""


class ResponseLog:
    """Reads every worker's log (so a rerun with another worker split finds old answers); appends to its own.

    In a folder the log is responses/<writer>.jsonl, appended and fsynced. An object store has no append, so
    each append is a new object responses/<writer>/<time>-<random>.jsonl (one per window), read back the same."""

    def __init__(self, cache_dir, writer_id: str):
        self.storage = open_storage(cache_dir)
        self.writer_id = writer_id
        self.folder = f"{self.storage.location}/{RESPONSES_DIR}"  # where the answers are kept (for messages)
        if self.storage.is_local:
            self.path = self.storage.root / RESPONSES_DIR / f"{writer_id}.jsonl"
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.reload()

    def reload(self) -> None:
        """Read every worker's log again (after the vLLM child wrote to it)."""
        self.records: dict[str, dict] = {}
        for name in self.storage.list_files(RESPONSES_DIR):
            if not name.endswith(".jsonl"):
                continue
            for line in self.storage.read_bytes(f"{RESPONSES_DIR}/{name}").decode().splitlines():
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
        lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        if self.storage.is_local:
            self._append_local(lines)
        else:
            name = f"{RESPONSES_DIR}/{self.writer_id}/{time.time_ns()}-{os.urandom(3).hex()}.jsonl"
            self.storage.write_atomic(name, lines.encode())
        for record in records:
            self.records[record["sample_id"]] = record

    def _append_local(self, lines: str) -> None:
        with open(self.path, "a") as f:
            if f.tell() and not self.path.read_bytes().endswith(b"\n"):
                f.write("\n")  # close a line cut short by a crash
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())


def log_answers(generator, processor, loaded: list[tuple[DataSample, list]], log: ResponseLog,
                max_length: int | None = None, answer_room: int = 2) -> None:
    """Generate and log an answer for every (sample, decoded images) pair that has none yet.

    A prompt the chat template cannot render, or one whose tokens (image tokens included) leave fewer than
    `answer_room` positions within `max_length` (one answer token and the end-of-turn), is logged as an
    error with its stage: the sample is rejected with that reason, and never sent to the generator."""
    records, prompts, waiting = [], [], []
    for sample, images in loaded:
        if log.get(sample.sample_id) is not None:
            continue
        try:
            text = render(processor, sample.messages, add_generation_prompt=True)
        except TemplateError as err:
            records.append({"sample_id": sample.sample_id, "error": str(err), "stage": "template"})
            continue
        if max_length is not None:
            n = prompt_length(processor, text, images)
            if n + answer_room > max_length:
                records.append({"sample_id": sample.sample_id, "stage": "length", "error": (
                    f"prompt of {n} tokens (image tokens included) leaves no room for an answer within "
                    f"--max-length {max_length}")})
                continue
        prompts.append((text, images))
        waiting.append(sample.sample_id)
    for sample_id, text in zip(waiting, generator.generate(prompts) if prompts else []):
        if isinstance(text, Failed):  # the model could not answer this prompt: the sample is rejected, with why
            records.append({"sample_id": sample_id, "stage": "generate", "error": f"generation failed: {text.reason}"})
        else:
            records.append({"sample_id": sample_id, "response": text})
    log.append(records)


def prompt_length(processor, text: str, images: list) -> int:
    """Tokens of a rendered prompt as the processor expands it (image placeholders become image tokens)."""
    return int(processor(text=[text], return_tensors="pt", **batched_images([images]))["input_ids"].shape[1])


def too_many_images(sample: DataSample, max_images: int | None) -> str | None:
    """The reject reason of a sample with more than --max-images images, else None."""
    if max_images is not None and len(sample.images) > max_images:
        return f"{len(sample.images)} images > --max-images {max_images}"
    return None


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
    """Write every missing answer with a vLLM engine in a child process; returns the seconds spent.

    `samples` are the ones not yet committed to the cache (and within --max-images). The child starts only
    when an answer is missing; when it has exited, its GPU memory is free for the HF teacher."""
    if all(log.get(s.sample_id) is not None for s in samples):
        return 0.0
    start = time.perf_counter()
    env = {**vllm_child_env(os.environ, cfg.tensor_parallel_size), **storage_options_env()}  # in memory, not on argv
    source_root = str(Path(__file__).resolve().parent.parent)  # so the child imports this same package
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source_root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-c", "from pipeline.response_log import vllm_child_main; vllm_child_main()",
               json.dumps(to_dict(cfg)), VLLM_GENERATOR, "1" if progress else "0"]
    done = subprocess.run(command, env=env)
    if done.returncode != 0:
        raise GenerationPhaseError(
            f"the vLLM generation phase failed (exit status {done.returncode}; its error is above). Answers "
            f"written so far are kept in {log.folder} and a rerun resumes; --backend hf generates without vLLM")
    log.reload()
    return time.perf_counter() - start


def vllm_child_env(environ, tensor_parallel_size: int) -> dict:
    """The vLLM child's environment: torchrun's variables removed, and under torchrun (LOCAL_RANK set) the
    GPUs of this worker only: local rank r gets GPUs r*tp .. r*tp+tp-1 of the visible ones.

    CUDA_VISIBLE_DEVICES is the one way to place an engine that every vLLM version honours, and it must be
    set before CUDA is initialised: a fresh child process is the place. (vLLM's "external_launcher" backend
    instead runs one engine across all torchrun ranks, each rank feeding the same prompts; our ranks split
    the data.)"""
    env = {k: v for k, v in environ.items() if k not in TORCHRUN_VARS and not k.startswith("TORCHELASTIC_")}
    if "LOCAL_RANK" not in environ:
        return env
    local, tp = int(environ["LOCAL_RANK"]), tensor_parallel_size
    visible = [d.strip() for d in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    wanted = range(local * tp, (local + 1) * tp)
    if visible and wanted.stop > len(visible):
        raise GenerationPhaseError(
            f"worker with LOCAL_RANK {local} needs GPUs {wanted.start}..{wanted.stop - 1} of CUDA_VISIBLE_DEVICES="
            f"{environ['CUDA_VISIBLE_DEVICES']} (--tensor-parallel-size {tp} per worker): start fewer workers per "
            "node (torchrun --nproc_per_node) or lower --tensor-parallel-size")
    env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[i] if visible else str(i) for i in wanted)
    return env


def vllm_child_main(argv: list[str] | None = None) -> None:
    """Entry of the vLLM child process: argv = DumpConfig as JSON, generator class, progress (1/0)."""
    from pipeline.dump_config import DumpConfig

    config, generator, progress = argv if argv is not None else sys.argv[1:]
    module, _, name = generator.partition(":")
    cfg = from_dict(DumpConfig, json.loads(config), "vllm phase arguments")
    run_vllm_phase(cfg, getattr(importlib.import_module(module), name), progress == "1")


def run_vllm_phase(cfg, generator_class, progress: bool) -> None:
    """Answer every sample of this worker's slice that is neither committed nor logged (in the child)."""
    from pipeline.dump_config import my_slice, writer_id
    from pipeline.store.layout import committed_sample_ids
    from pipeline.vlm.generation import model_sampling
    from pipeline.vlm.models import end_of_turn_ids, resolve_model, tokenizer_of
    from pipeline.vlm.processors import load_processor

    done, log = committed_sample_ids(cfg.out), ResponseLog(cfg.out, writer_id(cfg))
    todo = [s for s in my_slice(cfg) if isinstance(s, DataSample) and s.sample_id not in done
            and log.get(s.sample_id) is None and too_many_images(s, cfg.max_images) is None]
    if not todo:
        return
    path = resolve_model(cfg.model)
    processor = load_processor(path, trust_remote_code=cfg.trust_remote_code, revision=cfg.revision)
    tokenizer = tokenizer_of(processor)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    answer_room = 1 + len(end_of_turn_ids(tokenizer, template))
    generator = generator_class(
        path, cfg.generation, tensor_parallel_size=cfg.tensor_parallel_size, trust_remote_code=cfg.trust_remote_code,
        max_images=max(1, max(len(s.images) for s in todo)), dtype=cfg.dtype, max_model_len=cfg.max_length,
        revision=cfg.revision,
        sampling=model_sampling(path, cfg.generation, cfg.revision, cfg.trust_remote_code, processor))
    bar = _bar(len(todo), progress)
    for first in range(0, len(todo), cfg.window):
        window = todo[first : first + cfg.window]
        loaded, errors = [], []
        for sample in window:
            try:
                loaded.append((sample, [spec.load() for spec in sample.images]))
            except ImageError as err:
                errors.append({"sample_id": sample.sample_id, "error": str(err), "stage": "image"})
        log.append(errors)
        log_answers(generator, processor, loaded, log, cfg.max_length, answer_room)
        if bar is not None:
            bar.update(len(window))
    if bar is not None:
        bar.close()


def _bar(total: int, enabled: bool):
    return progress_bar(total, "generate (vllm)", unit="sample", enabled=enabled)
