"""CacheWriter: append teacher samples to a cache (a folder or an object-store URL), one owned shard at a time.

Many writers (processes, machines on a shared file system or one bucket) may write into one cache at
once with no coordination beyond the storage (schemas/COMMIT.md):
- each writer has an id and fills its own shards in a temporary folder;
- a full shard is committed as `shards/<id>-<seq>-<random>` by its Storage: on a local folder by
  renaming the flushed folder, on an object store by uploading it and then creating a commit object;
  readers only ever list committed names;
- a writer restarted with the same id deletes what it left uncommitted, and `done_ids` (every
  sample stored or rejected by any committed shard) lets the caller skip finished work, so rerunning
  the same command resumes.

    with CacheWriter("cache/", manifest, writer_id="w0") as writer:      # or "s3://bucket/cache"
        for sample in samples:
            if sample.sample_id not in writer.done_ids:
                writer.add(sample)
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np

from schemas import (
    MANIFEST_FILE,
    CacheManifest,
    as_format_version,
    expected_arrays,
    layer_array_names,
)
from pipeline import __version__
from pipeline.store.encoding import check_lossy_bound, decode_features, encode_features
from pipeline.store.backend import Storage, open_storage
from pipeline.store.layout import committed_sample_ids, read_cache_manifest
from pipeline.store.shard_files import write_shard

WRITER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclass
class TeacherSample:
    """Everything the teacher contributes for one (image, question, answer) sample.

    Per-position arrays have n rows, one per stored position (see PositionsInfo).
    `features` / `question_features` may be torch tensors (bf16 kept bit-exact) or numpy arrays;
    with a lossy cache encoding they may also arrive already encoded, together with their scales.
    """

    sample_id: str
    target_ids: Any  # [n] int
    features: Any  # [n, d]
    logsumexp: Any  # [n] float32: log-sum-exp of the teacher's logits at each position
    topk_ids: Any = None  # [n, k] int, descending probability
    topk_logprobs: Any = None  # [n, k]
    tail_logmass: Any = None  # [n] log(1 - sum(exp(topk_logprobs))) computed in full precision
    question_features: Any = None  # [q, d] or None
    feature_scales: Any = None  # given only with already-encoded lossy features (payload in `features`)
    question_feature_scales: Any = None
    layer_features: dict[int, Any] | None = None  # layer l -> [n, d] at the rows of `features`, one per manifest layer
    layer_feature_scales: dict[int, Any] | None = None  # given only with already-encoded lossy layer features
    source: str = ""
    images: list[str] = field(default_factory=list)
    messages: Any = field(default_factory=list)  # list of turns, or their JSON text
    answer: str = ""


class CacheWriter:
    """Appends samples to one cache folder; see the module docstring."""

    def __init__(self, cache_dir, manifest: CacheManifest, writer_id: str = "w0", background: bool = True):
        """`cache_dir`: a folder, an object-store URL (s3://, gs://, az://) or an open Storage."""
        if not WRITER_ID_PATTERN.match(writer_id):
            raise ValueError(f"writer id {writer_id!r} may hold only letters, digits, '_' and '.'")
        self.storage: Storage = open_storage(cache_dir)
        self.root = self.storage.location
        self.writer_id = writer_id
        self.manifest = ensure_manifest(self.storage, manifest)
        self._lock = self.storage.lock_writer(writer_id)
        try:
            self.storage.remove_leftovers(writer_id)
            self.done_ids, self._next_seq = self._scan_committed()
        except BaseException:
            self._lock.close()  # a bad index must not leave the lock held in this process
            raise
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._samples: list[dict] = []
        self._rejects: list[dict] = []
        self._buffered_ids: set[str] = set()
        self._buffered_tokens = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="cache-writer") if background else None
        self._pending: Future | None = None
        self.committed: list[str] = []

    def _scan_committed(self) -> tuple[set[str], int]:
        """(ids stored or rejected by any committed shard, this writer's next shard number)."""
        own = [name.split("-") for name in self.storage.committed_shards()]  # names are <writer>-<seq>-<random>
        seqs = [int(parts[1]) for parts in own if parts[0] == self.writer_id]
        return committed_sample_ids(self.storage, self.manifest), max(seqs, default=0) + 1

    # -- adding ------------------------------------------------------------------------
    def add(self, sample: TeacherSample) -> None:
        """Buffer one sample; commits a shard once `storage.shard_target_tokens` positions are buffered."""
        self._check_new(sample.sample_id)
        arrays = self._sample_arrays(sample)
        n, nq = len(arrays["target_ids"]), len(arrays["question_features"])
        for name, value in arrays.items():
            self._arrays.setdefault(name, []).append(value)
        self._samples.append(
            dict(
                sample_id=sample.sample_id,
                source=sample.source,
                images=list(sample.images),
                messages=sample.messages if isinstance(sample.messages, str) else json.dumps(sample.messages),
                answer=sample.answer,
                num_tokens=n,
                num_question_tokens=nq,
            )
        )
        self._buffered_ids.add(sample.sample_id)
        self._buffered_tokens += n
        if self._buffered_tokens >= self.manifest.storage.shard_target_tokens:
            self.flush()

    def reject(self, sample_id: str, stage: str, reason: str, source: str = "") -> None:
        """Record that a sample was refused; it is committed with the next shard and not retried on resume."""
        self._check_new(sample_id)
        self._rejects.append(dict(sample_id=sample_id, source=source, stage=stage, reason=reason))
        self._buffered_ids.add(sample_id)

    def is_done(self, sample_id: str) -> bool:
        return sample_id in self.done_ids or sample_id in self._buffered_ids

    def _check_new(self, sample_id: str) -> None:
        self._raise_background_error()
        if self.is_done(sample_id):
            raise ValueError(f"sample {sample_id!r} is already in the cache or in this writer's buffer")

    def _sample_arrays(self, s: TeacherSample) -> dict[str, np.ndarray]:
        m, where = self.manifest, f"sample {s.sample_id!r}"
        d, k = m.teacher.hidden_size, m.topk.k
        target_ids = np.asarray(s.target_ids, dtype=np.int64).reshape(-1)
        n = len(target_ids)
        if n == 0:
            raise ValueError(f"{where}: no stored positions (empty answer?)")
        if target_ids.min() < 0 or target_ids.max() >= m.teacher.vocab_size:
            raise ValueError(f"{where}: target ids outside [0, {m.teacher.vocab_size})")
        out = {"target_ids": target_ids.astype(np.int32)}
        feats, scales = self._encode(where, s.features, s.feature_scales)
        _expect_shape(where, "features", feats, (n, d))
        out["features"] = feats
        out["logsumexp"] = _vector(where, "logsumexp", s.logsumexp, n, np.float32)
        if scales is not None:
            out["feature_scales"] = _vector(where, "feature_scales", scales, n, np.float32)
        if k:
            if s.topk_ids is None or s.topk_logprobs is None or s.tail_logmass is None:
                raise ValueError(f"{where}: the cache stores top-{k}; topk_ids, topk_logprobs and tail_logmass are needed")
            out["topk_ids"] = _matrix(where, "topk_ids", s.topk_ids, (n, k), np.int32)
            out["topk_logprobs"] = _matrix(where, "topk_logprobs", s.topk_logprobs, (n, k), m.topk.logprob_dtype)
            out["tail_logmass"] = _vector(where, "tail_logmass", s.tail_logmass, n, np.float32)
        given = dict(s.layer_features or {})
        if sorted(given) != list(m.layers):
            raise ValueError(f"{where}: the cache stores layers {list(m.layers)}; this sample brings layer features "
                             f"for {sorted(given)}")
        for layer in m.layers:
            name, scales_name = layer_array_names(layer)
            scale = (s.layer_feature_scales or {}).get(layer)
            payload, scale = self._encode(f"{where} (layer {layer})", given[layer], scale)
            _expect_shape(where, name, payload, (n, d))
            out[name] = payload
            if scale is not None:
                out[scales_name] = _vector(where, scales_name, scale, n, np.float32)
        qf = s.question_features if s.question_features is not None else np.zeros((0, d), np.float32)
        qfeats, qscales = self._encode(f"{where} (question features)", qf, s.question_feature_scales)
        _expect_shape(where, "question_features", qfeats, (len(qfeats), d))
        out["question_features"] = qfeats
        if qscales is not None:
            out["question_feature_scales"] = _vector(where, "question_feature_scales", qscales, len(qfeats), np.float32)
        return out

    def _encode(self, where: str, features: Any, scales: Any) -> tuple[np.ndarray, np.ndarray | None]:
        """Encode raw features (checking a lossy encoding's stated bound), or pass through an encoded payload."""
        encoding = self.manifest.features
        if scales is not None:  # encoded (and checked) by the caller
            return np.ascontiguousarray(features), np.asarray(scales, dtype=np.float32).reshape(-1)
        payload, scales = encode_features(features, encoding.encoding)
        if scales is not None:
            decoded = decode_features(payload, scales, encoding.encoding)
            check_lossy_bound(features, decoded, encoding.encoding, encoding.min_cosine, where)
        return payload, scales

    # -- committing --------------------------------------------------------------------
    def flush(self) -> None:
        """Commit what is buffered as one shard (in the background thread when enabled)."""
        self._raise_background_error()
        if not self._samples and not self._rejects:
            return
        job = self._take_buffer()
        self.wait()  # at most one shard in flight: memory stays bounded
        if self._executor is None:
            self._commit(*job)
        else:
            self._pending = self._executor.submit(self._commit, *job)

    def wait(self) -> None:
        """Block until the shard in flight (if any) is committed; re-raise its error."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        try:
            self.flush()
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=True)
            if self._lock is not None:
                self._lock.close()
                self._lock = None

    def __enter__(self) -> "CacheWriter":
        return self

    def __exit__(self, *exc) -> None:
        # Buffered samples are complete: commit them even when the caller failed.
        self.close()

    def _take_buffer(self):
        counts = [s["num_tokens"] for s in self._samples]
        qcounts = [s["num_question_tokens"] for s in self._samples]
        arrays = {name: np.concatenate(parts) for name, parts in self._arrays.items()}
        if not self._samples:  # a shard of rejects only
            arrays = self._empty_arrays()
        arrays["offsets"] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        arrays["question_offsets"] = np.concatenate([[0], np.cumsum(qcounts)]).astype(np.int64)
        job = (arrays, self._samples, self._rejects, self._buffered_ids)
        self._arrays, self._samples, self._rejects = {}, [], []
        self._buffered_ids, self._buffered_tokens = set(), 0
        return job

    def _empty_arrays(self) -> dict[str, np.ndarray]:
        out = {}
        for name, (dtype, width) in expected_arrays(self.manifest).items():
            out[name] = np.zeros((0,) + ((width,) if width else ()), dtype=dtype)
        return out

    def _commit(self, arrays, samples, rejects, ids) -> None:
        seq = self._next_seq
        self._next_seq += 1
        suffix = os.urandom(4).hex()
        name = f"{self.writer_id}-{seq:06d}-{suffix}"
        tmp = self.storage.begin_shard(self.writer_id, suffix)
        try:
            write_shard(tmp, name, self.writer_id, self.manifest, arrays, samples, rejects)
            self._lock.check()  # a writer whose object-store lease was taken over commits nothing more
            self.storage.commit_shard(tmp, name)
        except BaseException:
            self.storage.discard_shard(tmp)
            raise
        self.done_ids.update(ids)
        self.committed.append(name)

    def _raise_background_error(self) -> None:
        if self._pending is not None and self._pending.done():
            self.wait()


def ensure_manifest(storage: Storage, manifest: CacheManifest) -> CacheManifest:
    """Create manifest.json if absent (first writer wins); otherwise check this run agrees with it."""
    stamped = replace(
        manifest,
        tool_version=__version__,
        created_at=manifest.created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    payload = (json.dumps(stamped.to_dict(), indent=2) + "\n").encode()
    if storage.create_exclusive(MANIFEST_FILE, payload):
        return stamped
    existing = read_cache_manifest(storage)
    # an older cache is resumed in its own version when this run needs nothing newer (a version-1 cache is a
    # version-2 cache without layers); its new shards are then written in that version too
    stamped = as_format_version(stamped, existing.format_version)
    existing.check_compatible(stamped, f"{storage.location}/{MANIFEST_FILE}")
    return existing


def _expect_shape(where: str, name: str, arr: np.ndarray, shape: tuple) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{where}: {name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")


def _vector(where: str, name: str, value: Any, n: int, dtype) -> np.ndarray:
    arr = _to_numpy(value).astype(dtype).reshape(-1)
    _expect_shape(where, name, arr, (n,))
    return arr


def _matrix(where: str, name: str, value: Any, shape: tuple, dtype) -> np.ndarray:
    arr = _to_numpy(value)
    _expect_shape(where, name, arr, shape)
    return np.ascontiguousarray(arr.astype(dtype))


def _to_numpy(value: Any) -> np.ndarray:
    if type(value).__module__.startswith("torch"):
        return value.detach().to("cpu").float().numpy() if value.is_floating_point() else value.cpu().numpy()
    return np.asarray(value)
