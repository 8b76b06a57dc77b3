"""`pipeline dump-teacher`: run a teacher VLM once over a data set and fill the cache.

    from pipeline.dump import DumpConfig, dump_teacher
    stats = dump_teacher(DumpConfig(model="qwen2-vl-72b", data="llava.json", image_root="/data", out="cache/"))

The recipe (`dump_teacher`): set up (this worker's slice of the data, the teacher, the cache
writer) -> generate (only with `responses="generate"`: the teacher writes the answers, logged in
`responses/<writer>.jsonl`) -> forward (the HF feature pass over length-sorted batches) -> commit
(the writer compresses and commits shards in a background thread).

Work goes a window of samples at a time: a thread decodes the next window's images while the
current one runs, and each image is decoded once for both generation and the forward pass. With
vLLM every answer is written before the HF teacher is loaded, by a child process that has exited (and
so given back all its GPU memory) when the teacher loads (`pipeline.response_log.generate_with_vllm`).
Samples are split between workers by their index in the data (`i % num_workers == worker_index`);
every sample already committed (stored or rejected) by any worker is skipped, and logged answers
are not generated again, so rerunning the same command resumes.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pipeline.progress import progress_bar
from pipeline.dump_config import (
    DumpConfig,
    build_manifest,
    load_teacher,
    my_slice,
    resolve_layers,
    save_teacher_files,
    teacher_layer_count,
    writer_id,
)
from pipeline.feature_pass import FeaturePass, pack_batches
from pipeline.response_log import ResponseLog, choose_answer, generate_with_vllm, log_answers, too_many_images
from pipeline.store.backend import open_storage
from pipeline.store.layout import committed_sample_ids
from pipeline.store.writer import CacheWriter
from pipeline.vlm.data import BadSample, DataSample, ImageError
from pipeline.vlm.generation import HFGenerator, resolve_backend
from pipeline.vlm.images import store_image
from pipeline.vlm.prompting import TemplateError, encode_sample


@dataclass
class DumpStats:
    """What one worker did in one run."""

    written: int = 0
    rejected: int = 0
    skipped: int = 0  # already in the cache from an earlier run or another worker
    tokens: int = 0  # positions the body ran over (prompt + answer, no padding)
    stored_tokens: int = 0
    forward_seconds: float = 0.0  # body + head, synchronised
    generate_seconds: float = 0.0  # the teacher writing answers (vLLM: engine start included)
    feature_seconds: float = 0.0  # the feature pass: prepare, forward, encode, commit (generation excluded)
    total_seconds: float = 0.0  # the whole run, model loading included
    reject_reasons: dict = field(default_factory=dict)  # stage -> count
    slice_samples: int = 0  # this worker's samples, done in any run
    slice_rejects: list = field(default_factory=list)  # (sample_id, stage, reason) of those rejected, any run

    @property
    def outside_forward_share(self) -> float:
        """Share of the feature pass's wall time spent outside the model forward."""
        return 1 - self.forward_seconds / self.feature_seconds if self.feature_seconds else 0.0


@dataclass
class Loaded:
    """A sample with its images decoded, waiting for its answer and its encoding."""

    sample: DataSample
    images: list


def dump_teacher(cfg: DumpConfig, progress: bool = True) -> DumpStats:
    start = time.perf_counter()
    stats = DumpStats()
    # -- set up
    open_storage(cfg.out).check_access(write=True)  # a missing bucket or refused credentials: before any model loads
    backend = resolve_backend(cfg.backend) if cfg.responses == "generate" else None
    if cfg.layers and backend == "vllm":  # vLLM answers everything before the teacher loads: check --layers first
        resolve_layers(cfg.layers, teacher_layer_count(cfg))
    samples = list(my_slice(cfg))  # an unreadable data file fails here; images stay lazy
    log = ResponseLog(cfg.out, writer_id(cfg)) if backend else None
    if backend == "vllm":  # generate: all answers now, before the HF teacher takes the GPUs
        done = committed_sample_ids(cfg.out)
        todo = [s for s in samples if isinstance(s, DataSample) and s.sample_id not in done
                and too_many_images(s, cfg.max_images) is None]
        stats.generate_seconds = generate_with_vllm(cfg, todo, log, progress)
    teacher = load_teacher(cfg)  # a wrong --model fails here, before anything is written
    generator = HFGenerator(teacher.vlm, cfg.generation, cfg.generate_batch_size) if backend == "hf" else None
    with CacheWriter(cfg.out, build_manifest(cfg, teacher, backend), writer_id(cfg)) as writer:
        save_teacher_files(cfg.out, teacher)
        todo = [s for s in samples if not writer.is_done(s.sample_id)]
        stats.skipped = len(samples) - len(todo)
        # -- generate (HF, per window) -> forward -> commit
        _run_windows(cfg, teacher, writer, todo, log, generator, stats, progress)
    _count_slice(cfg, {s.sample_id for s in samples}, stats)
    stats.total_seconds = time.perf_counter() - start
    return stats


def _count_slice(cfg: DumpConfig, ids: set[str], stats: DumpStats) -> None:
    """This worker's samples done in any run, and its rejects with their reasons (for `rejection_problem`)."""
    from pipeline.store.reader import CacheReader

    reader = CacheReader(cfg.out)
    rejects = [(r["sample_id"], r["stage"], r["reason"]) for r in reader.rejects_table().to_pylist() if r["sample_id"] in ids]
    stats.slice_rejects = rejects
    stats.slice_samples = len(ids.intersection(reader.sample_ids)) + len(rejects)


# What to try first when most samples are rejected at a stage.
REJECT_HINTS = {
    "image": "check --image-root (relative image paths are resolved under it) and that the image files exist",
    "images": "raise --max-images",
    "length": "raise --max-length (generated answers: or lower --max-new-tokens)",
    "template": "this chat template refuses these conversations (see the reasons); try another teacher revision",
    "data": "check the data file's format (LLaVA JSON or TRL messages + images)",
    "answer": "the data's answers are empty; use --responses generate",
    "generate": "see the reasons; with --keep-if-correct --on-incorrect reject, a teacher that disagrees with the "
                "references loses those samples: use --on-incorrect reference, or accept it with --max-reject-fraction 1",
}


# With --responses generate an empty answer is the teacher's, not the data's: it stopped at once.
GENERATED_EMPTY_HINT = ("the teacher's own answers are empty (its first token was a stop id): check that its chat "
                        "template ends the prompt with the assistant's turn, its eos/stop ids (generation_config.json) "
                        "and that the model answers these prompts; or use the data's answers (--responses dataset)")


def reject_hint(cfg: DumpConfig, stage: str) -> str:
    """What to try first when most samples are rejected at `stage`, for this run's answer source."""
    if stage == "answer" and cfg.responses == "generate":
        return GENERATED_EMPTY_HINT
    return REJECT_HINTS.get(stage, "see the reasons")


def rejection_problem(cfg: DumpConfig, stats: DumpStats) -> str | None:
    """The error to exit with when too many of this worker's samples were rejected, else None.

    Every sample rejected always fails (a cache with nothing in it is never a success); otherwise more than
    --max-reject-fraction of them fails. The message counts the reasons, names a few samples and says what to do."""
    total, rejected = stats.slice_samples, len(stats.slice_rejects)
    if not rejected or (rejected < total and rejected <= cfg.max_reject_fraction * total):
        return None
    by_stage: dict[str, list] = {}
    for sample_id, stage, reason in stats.slice_rejects:
        by_stage.setdefault(stage, []).append((sample_id, reason))
    lines = [f"{rejected} of {total} samples of worker {cfg.worker_index} were rejected"
             + ("" if rejected == total else f" (more than --max-reject-fraction {cfg.max_reject_fraction})") + ":"]
    leading = sorted(by_stage.items(), key=lambda kv: -len(kv[1]))
    for stage, rows in leading[:4]:
        ids = ", ".join(sid for sid, _ in rows[:3]) + (", ..." if len(rows) > 3 else "")
        lines.append(f"  {stage} {len(rows)}: {ids}; e.g. {rows[0][1][:160]}")
    lines.append(f"What to do: {reject_hint(cfg, leading[0][0])}. Rejected samples are not "
                 f"retried on a rerun: dump to a new --out after the fix. All of them: pipeline inspect {cfg.out} --rejects")
    return "\n".join(lines)


def _run_windows(cfg: DumpConfig, teacher, writer: CacheWriter, todo: list, log, generator, stats: DumpStats, progress):
    """Per window: missing answers (HF generator), encoding, forward passes, samples to the writer."""
    start, generating = time.perf_counter(), 0.0
    feature_pass = FeaturePass(teacher, writer.manifest)
    windows = list(_windows(todo, cfg.window))
    bar = _bar(len(todo), progress)
    # The processor is never used by two threads at once (a fast tokenizer's padding setting is
    # shared state): with a generator the thread only decodes images and this thread encodes.
    encode_ahead = generator is None
    with ThreadPoolExecutor(1, thread_name_prefix="prepare") as pool:
        pending = pool.submit(_prepare_window, cfg, teacher, windows[0], log, encode_ahead) if windows else None
        for i, window in enumerate(windows):
            items = pending.result()
            if i + 1 < len(windows):
                pending = pool.submit(_prepare_window, cfg, teacher, windows[i + 1], log, encode_ahead)
            if generator is not None:
                t0 = time.perf_counter()
                loaded = [(x.sample, x.images) for x in items if isinstance(x, Loaded)]
                log_answers(generator, teacher.processor, loaded, log, cfg.max_length, 1 + len(teacher.end_of_turn))
                generating += time.perf_counter() - t0
                items = [_encode(cfg, teacher, x, log) if isinstance(x, Loaded) else x for x in items]
            _forward_and_commit(cfg, feature_pass, writer, items, stats)
            if bar is not None:
                bar.update(len(window))
                bar.set_postfix(tok_s=f"{stats.tokens / (time.perf_counter() - start):.0f}", rejected=stats.rejected)
    if bar is not None:
        bar.close()
    writer.flush()
    writer.wait()  # the last shard is committed inside the measured time
    stats.generate_seconds += generating
    stats.feature_seconds = time.perf_counter() - start - generating


def _forward_and_commit(cfg: DumpConfig, feature_pass: FeaturePass, writer: CacheWriter, items: list, stats: DumpStats):
    """Rejects to the writer with their reasons; the rest through the teacher in length-sorted batches."""
    for item in (x for x in items if isinstance(x, BadSample)):
        writer.reject(item.sample_id, item.stage, item.reason, item.source)
        stats.rejected += 1
        stats.reject_reasons[item.stage] = stats.reject_reasons.get(item.stage, 0) + 1
    ready = [x for x in items if not isinstance(x, BadSample)]
    for batch in pack_batches(ready, cfg.max_batch_tokens):
        for teacher_sample in feature_pass.run(batch, stats):
            writer.add(teacher_sample)
            stats.written += 1


def _prepare_window(cfg: DumpConfig, teacher, window: list, log, encode: bool) -> list:
    """Each sample's images decoded (and in-memory ones saved into the cache); encoded too when `encode`."""
    items = [_load(cfg, sample) for sample in window]
    return [_encode(cfg, teacher, x, log) if encode and isinstance(x, Loaded) else x for x in items]


def _load(cfg: DumpConfig, sample) -> Loaded | BadSample:
    if isinstance(sample, BadSample):
        return sample
    if reason := too_many_images(sample, cfg.max_images):  # before decoding: these never reach a model
        return BadSample(sample.sample_id, sample.source, "images", reason)
    try:
        images = [spec.load() for spec in sample.images]
    except ImageError as err:
        return BadSample(sample.sample_id, sample.source, "image", str(err))
    for spec, image in zip(sample.images, images):
        store_image(cfg.out, spec.ref, image)  # in-memory images travel with the cache
    return Loaded(sample, images)


def _encode(cfg: DumpConfig, teacher, item: Loaded, responses: ResponseLog | None):
    """(EncodedSample, DataSample) ready for the forward pass, or a BadSample saying why not."""
    sample = item.sample

    def bad(stage: str, reason: str) -> BadSample:
        return BadSample(sample.sample_id, sample.source, stage, reason)

    answer = sample.answer
    if responses is not None:
        record = responses.get(sample.sample_id)
        answer, problem = choose_answer(cfg, record, sample.answer)
        if problem:  # logged errors name their stage (length, template, image); older logs do not
            return bad((record or {}).get("stage", "generate"), problem)
    if not answer or not answer.strip():
        return bad("answer", "empty generated answer" if responses is not None else "empty answer")
    try:
        encoded = encode_sample(teacher.processor, sample.sample_id, sample.messages, item.images, answer, teacher.end_of_turn)
    except TemplateError as err:
        return bad("template", str(err))
    if encoded.total_len > cfg.max_length:
        return bad("length", f"{encoded.total_len} tokens > --max-length {cfg.max_length}")
    sample.answer = answer
    return encoded, sample


def _windows(items: list, size: int):
    """A small first window (so the model starts early), then windows of `size`."""
    first = min(8, size)
    yield from ([items[:first]] if items else [])
    for i in range(first, len(items), size):
        yield items[i : i + size]


def _bar(total: int, enabled: bool):
    return progress_bar(total, "dump-teacher", unit="sample", enabled=enabled)
