"""Cache samples -> student inputs: the student's own processor and chat template build its
prompt and answer; the cache supplies the teacher's side (features, targets, top-k).

    data = CacheStudentData("cache/", student_processor, student_end_of_turn)
    loader = DataLoader(data, batch_sampler=ShardWindowSampler(data.shards, data.lengths, 8).batches(),
                        collate_fn=data.collate)

Training reads the cache in blocks (the default, `cache_reads="block"`): the batch order follows
the shard structure (shards shuffled per epoch, a window of a few shards as the shuffle buffer,
length-grouped batches within the window) and each DataLoader worker reads whole shards into an
LRU of a window's worth. `cache_reads="random"` keeps the globally shuffled order with one read
per sample (about 50x slower per sample).

`CacheStudentData(..., layers=True)` also hands every item the cache's intermediate teacher layers
(`teacher_layers`, float32 per layer, the rows of `teacher_features`); a cache without them fails at once, with
what to dump (`schemas.require_layers`).

The teacher's and the student's token sequences never need aligning: the student's answer
ids (its own targets) come from its tokenizer, the teacher's from the cache.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch

from pipeline.vlm.data import BadSample, DataError, read_samples
from pipeline.vlm.images import open_image_ref
from pipeline.vlm.prompting import EncodedSample, collate, encode_sample
from pipeline.store.reader import CacheReader
from student.losses import TopKTarget
from student.packing import pack, unpack


@dataclass
class StudentItem:
    sample_id: str
    student: EncodedSample  # student prompt inputs + the student's answer ids (gt_s)
    teacher_features: torch.Tensor | None = None  # z_al [n, d_l] float32: last prompt position + answer but its last token
    teacher_targets: torch.Tensor | None = None  # gt_l [n]
    teacher_topk: TopKTarget | None = None
    teacher_question: torch.Tensor | None = None  # z_ql [q, d_l] float32, for the samples that have it
    teacher_layers: dict[int, torch.Tensor] | None = None  # layer -> [n, d_l] float32, rows of teacher_features (layers=True)


@dataclass
class StudentBatch:
    inputs: dict  # right-padded student prompt + answer (collate of pipeline.vlm.prompting)
    items: list[StudentItem]

    @property
    def prompt_lens(self) -> list[int]:
        return [item.student.prompt_len for item in self.items]

    # pickled (from a DataLoader worker) as one buffer per dtype: see student/packing.py
    def __getstate__(self):
        return pack((self.inputs, self.items))

    def __setstate__(self, state):
        self.inputs, self.items = unpack(state)


class CacheStudentData(torch.utils.data.Dataset):
    """Map-style dataset over a cache's committed samples, encoded for one student."""

    def __init__(self, cache_dir, processor, end_of_turn, pad_id: int, image_root: str | None = None, sample_ids=None,
                 teacher: bool = True, layers: bool = False):
        self.reader = cache_dir if isinstance(cache_dir, CacheReader) else CacheReader(cache_dir)  # or an open one
        self.teacher = teacher  # False: the student side only (stage 3 needs no teacher arrays)
        # True: every item also carries the cache's intermediate teacher layers (a cache without them fails here)
        self.layers = self.reader.require_layers() if layers else ()
        if self.layers and not self.reader.read_layers:
            raise ValueError(f"{self.reader.root}: the reader was opened with read_layers=False, so its samples carry "
                             "no intermediate layers; open it with read_layers=True")
        self.processor, self.end_of_turn, self.pad_id = processor, set(end_of_turn), pad_id
        data = self.reader.manifest.data
        self.image_root = image_root or data.image_root
        self.sample_ids = list(sample_ids) if sample_ids is not None else self.reader.sample_ids
        self.lengths = [self.reader.num_tokens(sid) for sid in self.sample_ids]  # teacher answer lengths, for grouping
        self.shards = [self.reader.location(sid)[0] for sid in self.sample_ids]  # for shard-ordered batches
        self.block_reads = True  # teacher arrays cut from whole shards in memory; False: one read per sample

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, i: int) -> StudentItem:
        sid = self.sample_ids[i]
        meta = self.reader.sample_meta(sid)
        images = [open_image_ref(ref, self.reader.root, self.image_root) for ref in meta["images"]]
        encoded = encode_sample(self.processor, sid, meta["messages"], images, meta["answer"], self.end_of_turn)
        if not self.teacher:
            return StudentItem(sid, encoded)
        cached = self.reader.get_from_block(sid) if self.block_reads else self.reader.get(sid)
        topk = None
        if cached.topk_ids is not None:
            topk = TopKTarget(torch.from_numpy(cached.topk_ids), torch.from_numpy(cached.topk_logprobs.astype("float32")),
                              torch.from_numpy(cached.tail_logmass))
        question = cached.question_features_float32()
        return StudentItem(
            sample_id=sid,
            student=encoded,
            teacher_features=torch.from_numpy(cached.features_float32()),
            teacher_targets=torch.from_numpy(cached.target_ids.astype("int64")),
            teacher_topk=topk,
            teacher_question=None if question is None else torch.from_numpy(question),
            teacher_layers={l: torch.from_numpy(cached.layer_features_float32(l)) for l in self.layers} or None,
        )

    def collate(self, items: list[StudentItem]) -> StudentBatch:
        return StudentBatch(collate([item.student for item in items], self.pad_id), items)


class SourceStudentData(torch.utils.data.Dataset):
    """Map-style dataset over a data source's samples (no teacher): plain SFT, e.g. training the demo
    teacher from scratch. Malformed records are left out (the count is in `skipped`)."""

    def __init__(self, source: str, processor, end_of_turn, pad_id: int, image_root: str | None = None,
                 limit: int | None = None):
        self.processor, self.end_of_turn, self.pad_id = processor, set(end_of_turn), pad_id
        self.samples, self.skipped = [], 0
        for sample in read_samples(source, image_root):
            if limit is not None and len(self.samples) + self.skipped >= limit:
                break
            if isinstance(sample, BadSample) or not sample.answer:
                self.skipped += 1
            else:
                self.samples.append(sample)
        if not self.samples:
            raise DataError(f"data source {source} has no usable sample")
        # grouping by prompt length only: with one-word answers, a length that counts the answer would put
        # equal answers in one batch (measured on easy-VQA: two shape questions in a batch shared their answer
        # 65% of the time, against 35% shuffled)
        self.lengths = [len(json.dumps(s.messages)) for s in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> StudentItem:
        s = self.samples[i]
        images = [spec.load() for spec in s.images]
        return StudentItem(s.sample_id, encode_sample(self.processor, s.sample_id, s.messages, images, s.answer,
                                                      self.end_of_turn))

    def collate(self, items: list[StudentItem]) -> StudentBatch:
        return StudentBatch(collate([item.student for item in items], self.pad_id), items)


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Batches of similar length (less padding), in a shuffled order that a seed and an epoch fix."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int = 0, group: int = 50):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group
        self.epoch = 0

    def batches(self) -> list[list[int]]:
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        out = length_grouped(list(range(len(self.lengths))), self.lengths, self.batch_size, self.group, rng)
        rng.shuffle(out)
        return out

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return (len(self.lengths) + self.batch_size - 1) // self.batch_size


class ShardWindowSampler:
    """Length-grouped batches in shard order, as streaming loaders read: per epoch the shards are shuffled
    (seed, epoch) and taken `window` at a time; a window is the shuffle buffer: its samples are shuffled,
    grouped by length and cut into batches, and those batches shuffled. No batch mixes two windows, so a
    reader holding `window` whole shards reads each shard once per epoch."""

    def __init__(self, shards: list[str], lengths: list[int], batch_size: int, seed: int = 0, window: int = 4,
                 group: int = 50):
        if len(shards) != len(lengths):
            raise ValueError(f"{len(shards)} shard names for {len(lengths)} samples")
        if window < 1:
            raise ValueError(f"the shuffle window must hold at least one shard, not {window}")
        self.shards, self.lengths, self.batch_size, self.seed = shards, lengths, batch_size, seed
        self.window, self.group = window, group
        self.epoch = 0
        self._members: dict[str, list[int]] = {}  # shard -> its sample indices, in first-seen shard order
        for i, name in enumerate(shards):
            self._members.setdefault(name, []).append(i)

    def batches(self) -> list[list[int]]:
        # a seed stream apart from LengthGroupedSampler's, so that the two orders are not correlated
        rng = random.Random(f"shard-window:{self.seed}:{self.epoch}")
        names = list(self._members)
        rng.shuffle(names)
        out = []
        for start in range(0, len(names), self.window):
            indices = [i for name in names[start : start + self.window] for i in self._members[name]]
            window_batches = length_grouped(indices, self.lengths, self.batch_size, self.group, rng)
            rng.shuffle(window_batches)
            out += window_batches
        return out

    def __len__(self) -> int:
        return len(self.batches())


def length_grouped(indices: list[int], lengths: list[int], batch_size: int, group: int, rng: random.Random):
    """Shuffle `indices`, then sort each run of `batch_size * group` by length and cut it into batches."""
    order = list(indices)
    rng.shuffle(order)
    chunk = batch_size * group
    out = []
    for start in range(0, len(order), chunk):
        block = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        out += [block[i : i + batch_size] for i in range(0, len(block), batch_size)]
    return out


CACHE_READS = ("block", "random")
DEFAULT_SHUFFLE_SHARDS = 4


def read_settings(cfg) -> tuple[str, int]:
    """(cache_reads, shuffle_shards) of a TrainConfig; configs without these fields get the defaults."""
    reads = getattr(cfg, "cache_reads", "block")
    window = getattr(cfg, "shuffle_shards", DEFAULT_SHUFFLE_SHARDS)
    if reads not in CACHE_READS:
        raise ValueError(f"cache_reads must be one of {CACHE_READS}, not {reads!r}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"shuffle_shards must be a positive number of shards, not {window!r}")
    return reads, window


def make_loader(data, cfg, first: int, rank: int = 0, world: int = 1):
    """Iterator over this rank's micro-batches from global micro-batch `first` on (a resumed run skips
    what was done; rank r of W takes every W-th). With num_workers > 0, worker processes read the cache
    and run the student's processor."""
    reads, window = read_settings(cfg)
    if isinstance(data, CacheStudentData):
        data.block_reads = reads == "block"
        data.reader.max_block_shards = window  # a worker holds one shuffle window of whole shards
    order = batch_order(data, cfg, world)[first:][rank::world]
    start = data.reader.worker_start_method if isinstance(data, CacheStudentData) and cfg.num_workers else None
    loader = torch.utils.data.DataLoader(
        data, batch_sampler=order, collate_fn=data.collate, num_workers=cfg.num_workers,
        prefetch_factor=4 if cfg.num_workers else None, multiprocessing_context=start,
    )
    return iter(loader)


def batch_order(data, cfg, world: int = 1) -> list[list[int]]:
    """Enough length-grouped batches for the whole stage on all ranks, epoch after epoch, fixed by the seed:
    shard-window order for a cache read in blocks, a global shuffle otherwise (random reads, data sources)."""
    reads, window = read_settings(cfg)
    if reads == "block" and hasattr(data, "shards"):
        sampler = ShardWindowSampler(data.shards, data.lengths, cfg.batch_size, seed=cfg.seed, window=window)
    else:
        sampler = LengthGroupedSampler(data.lengths, cfg.batch_size, seed=cfg.seed)
    order, needed = [], cfg.steps * cfg.grad_accum * world
    while len(order) < needed:
        order += sampler.batches()
        sampler.epoch += 1
    return order
