"""`pipeline dump-teacher`: run a teacher VLM once over a data set and fill the cache.

    from pipeline.dump import DumpConfig, dump_teacher
    stats = dump_teacher(DumpConfig(model="qwen2-vl-72b", data="llava.json", image_root="/data", out="cache/"))

Two phases, each resumable: (1) with `responses="generate"`, the teacher writes
answers (vLLM or HF), appended to `responses/<writer>.jsonl`; (2) the HF feature pass
runs over length-sorted batches while the cache writer compresses and commits shards
in a background thread. Samples are split between workers by their index in the data
(`i % num_workers == worker_index`); every sample already committed (stored or
rejected) by any worker is skipped, so rerunning the same command resumes.
"""

from __future__ import annotations

import gc
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from pipeline.vlm.data import BadSample, DataSample, ImageError, read_samples
from pipeline.vlm.images import store_image
from pipeline.feature_pass import FeaturePass, pack_batches
from pipeline.response_log import ResponseLog, generate_responses, make_generator
from pipeline.dump_config import DumpConfig, build_manifest, load_teacher, save_teacher_files, writer_id
from pipeline.store.layout import committed_sample_ids
from pipeline.vlm.models import load_processor, resolve_model
from pipeline.vlm.prompting import TemplateError, encode_sample
from pipeline.vlm.answers import answers_agree
from pipeline.vlm.generation import resolve_backend
from pipeline.store.writer import CacheWriter


@dataclass
class DumpStats:
    """What one worker did in one run."""

    written: int = 0
    rejected: int = 0
    skipped: int = 0  # already in the cache from an earlier run or another worker
    tokens: int = 0  # positions the body ran over (prompt + answer, no padding)
    stored_tokens: int = 0
    forward_seconds: float = 0.0  # body + head, synchronised
    wall_seconds: float = 0.0  # feature phase only (generation excluded)
    reject_reasons: dict = field(default_factory=dict)

    @property
    def outside_forward_share(self) -> float:
        return 1 - self.forward_seconds / self.wall_seconds if self.wall_seconds else 0.0


def dump_teacher(cfg: DumpConfig, progress: bool = True) -> DumpStats:
    stats = DumpStats()
    backend = resolve_backend(cfg.backend) if cfg.responses == "generate" else None
    samples = list(_my_slice(cfg))  # an unreadable data file fails here; images stay lazy
    log = ResponseLog(cfg.out, writer_id(cfg)) if backend else None
    if backend == "vllm":  # vLLM needs the GPUs to itself: generate before the HF teacher is loaded
        _generate_with_vllm(cfg, samples, log, progress)
    teacher = load_teacher(cfg)  # a wrong --model fails here, before anything is written
    with CacheWriter(cfg.out, build_manifest(cfg, teacher), writer_id(cfg)) as writer:
        save_teacher_files(cfg.out, teacher)
        todo = [s for s in samples if not writer.is_done(s.sample_id)]
        stats.skipped = len(samples) - len(todo)
        if backend == "hf":
            generator = make_generator(cfg, "hf", teacher.vlm.path, teacher)
            generate_responses(cfg, teacher.processor, _usable(todo), log, generator, progress)
        _feature_phase(cfg, teacher, writer, todo, log, stats, progress)
    return stats


def _feature_phase(cfg: DumpConfig, teacher, writer: CacheWriter, todo: list, log, stats: DumpStats, progress: bool):
    """Forward passes over windows of samples; the next window is prepared (images, templates,
    processor) in a thread while the current one runs, and shards are committed in the writer's thread."""
    start = time.perf_counter()
    feature_pass = FeaturePass(cfg, teacher, writer.manifest)
    windows = list(_windows(todo, cfg.window))
    bar = _bar(len(todo), progress)
    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
        pending = pool.submit(_prepare_window, cfg, teacher, windows[0], log) if windows else None
        for i, window in enumerate(windows):
            ready, bad = pending.result()
            if i + 1 < len(windows):
                pending = pool.submit(_prepare_window, cfg, teacher, windows[i + 1], log)
            for item in bad:
                writer.reject(item.sample_id, item.stage, item.reason, item.source)
                stats.rejected += 1
                stats.reject_reasons[item.stage] = stats.reject_reasons.get(item.stage, 0) + 1
            for batch in pack_batches(ready, cfg.max_batch_tokens):
                for teacher_sample in feature_pass.run(batch, stats):
                    writer.add(teacher_sample)
                    stats.written += 1
            if bar is not None:
                bar.update(len(window))
                bar.set_postfix(tok_s=f"{stats.tokens / (time.perf_counter() - start):.0f}", rejected=stats.rejected)
    if bar is not None:
        bar.close()
    writer.flush()
    writer.wait()  # the last shard is committed inside the measured time
    stats.wall_seconds = time.perf_counter() - start


def _prepare_window(cfg: DumpConfig, teacher, window: list, log) -> tuple[list, list[BadSample]]:
    ready, bad = [], []
    for sample in window:
        item = _prepare(cfg, teacher, sample, log)
        (bad if isinstance(item, BadSample) else ready).append(item)
    return ready, bad


def _generate_with_vllm(cfg: DumpConfig, samples: list, log: ResponseLog, progress: bool) -> None:
    done = committed_sample_ids(cfg.out)
    todo = [s for s in _usable(samples) if s.sample_id not in done]
    if not any(log.get(s.sample_id) is None for s in todo):
        return
    path = resolve_model(cfg.model)
    processor = load_processor(path, trust_remote_code=cfg.trust_remote_code)
    generator = make_generator(cfg, "vllm", path)
    generate_responses(cfg, processor, todo, log, generator, progress)
    del generator  # frees the engine's GPU memory before the HF teacher loads
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _usable(samples: list) -> list[DataSample]:
    return [s for s in samples if isinstance(s, DataSample)]


def _prepare(cfg: DumpConfig, teacher, sample, responses: ResponseLog | None):
    """DataSample -> (EncodedSample, DataSample) ready for the forward pass, or a BadSample saying why not."""
    if isinstance(sample, BadSample):
        return sample

    def bad(stage: str, reason: str) -> BadSample:
        return BadSample(sample.sample_id, sample.source, stage, reason)

    try:
        images = [spec.load() for spec in sample.images]
    except ImageError as err:
        return bad("image", str(err))
    for spec, image in zip(sample.images, images):
        store_image(cfg.out, spec.ref, image)  # in-memory images travel with the cache
    answer = sample.answer
    if responses is not None:
        answer, problem = choose_answer(cfg, responses.get(sample.sample_id), sample.answer)
        if problem:
            return bad("generate", problem)
    if not answer or not answer.strip():
        return bad("answer", "empty answer")
    try:
        encoded = encode_sample(teacher.processor, sample.sample_id, sample.messages, images, answer, teacher.end_of_turn)
    except TemplateError as err:
        return bad("template", str(err))
    if encoded.total_len > cfg.max_length:
        return bad("length", f"{encoded.total_len} tokens > --max-length {cfg.max_length}")
    sample.answer = answer
    return encoded, sample


def choose_answer(cfg: DumpConfig, record: dict | None, reference: str | None) -> tuple[str | None, str | None]:
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


def _my_slice(cfg: DumpConfig):
    for i, sample in enumerate(read_samples(cfg.data, image_root=cfg.image_root, split=cfg.split)):
        if cfg.limit is not None and i >= cfg.limit:
            return
        if i % cfg.num_workers == cfg.worker_index:
            yield sample


def _windows(items: list, size: int):
    """A small first window (so the model starts early), then windows of `size`."""
    first = min(8, size)
    yield from ([items[:first]] if items else [])
    for i in range(first, len(items), size):
        yield items[i : i + size]


def _bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc="dump-teacher", unit="sample", dynamic_ncols=True)
