"""`pipeline verify`: check a cache against its contract, shard by shard.

Checks: the manifest (schema, version); the teacher head (shape); each committed
shard's index (schema, agreement with the manifest), the sha256 of every file, the
arrays (readable: every zarr chunk carries a crc32c; dtype, shape and content
sha256 as recorded; offsets consistent; ids in range), the Parquet tables (rows match
the index). Problems are collected per shard so one bad shard never hides another.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from schemas import INDEX_FILE, REJECTS_FILE, SAMPLES_FILE, CacheFormatError, CacheManifest
from pipeline.progress import progress_bar
from pipeline.store.backend import Storage, open_storage
from pipeline.store.layout import load_index, read_cache_manifest, shard_dir
from pipeline.store.shard_files import array_sha256, open_arrays, read_table
from pipeline.store.teacher_head import check_teacher_head

TEACHER_KEY = "teacher"


@dataclass
class VerifyReport:
    cache: str
    shards_checked: int = 0
    samples: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)  # shard name (or "teacher") -> problems
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, key: str, problem: str) -> None:
        self.problems.setdefault(key, []).append(problem)


def verify_cache(cache_dir, progress: bool = False) -> VerifyReport:
    """Check everything; raises CacheFormatError only when the manifest itself is unusable.

    `cache_dir`: a folder, an object-store URL or an open Storage."""
    root = open_storage(cache_dir)
    manifest = read_cache_manifest(root)
    report = VerifyReport(root.location)
    try:
        check_teacher_head(root, manifest)
    except CacheFormatError as err:
        report.add(TEACHER_KEY, str(err))
    names = root.committed_shards()
    seen: dict[str, str] = {}
    for name in _progress(names, progress):
        report.shards_checked += 1
        problems, ids = verify_shard(root, name, manifest)
        for p in problems:
            report.add(name, p)
        for sid in ids:
            if sid in seen:
                report.warnings.append(f"sample {sid!r} is in shards {seen[sid]} and {name}; readers use the first")
            else:
                seen[sid] = name
    report.samples = len(seen)
    for tmp in root.uncommitted_shards():
        report.warnings.append(
            f"leftover temporary folder shards/{tmp} (a writer was killed or is still running; "
            "rerunning that writer removes it, readers ignore it)"
        )
    return report


def verify_shard(root: Storage, name: str, manifest: CacheManifest) -> tuple[list[str], tuple[str, ...]]:
    """(problems, sample ids) of one shard."""
    folder = shard_dir(name)
    try:
        index = load_index(root, name, manifest)
    except CacheFormatError as err:
        return [str(err)], ()
    problems = _check_commit(root, name) + _check_files(root, folder, index.files)
    try:
        arrays = open_arrays(root, folder)
    except Exception as err:  # zarr raises several types for damaged metadata
        return problems + [f"arrays/ cannot be opened: {err}"], index.sample_ids
    for array_name, record in index.arrays.items():
        try:
            data = arrays[array_name][...]
        except Exception as err:
            problems.append(f"array {array_name}: unreadable ({type(err).__name__}: {err})")
            continue
        if str(data.dtype) != record.dtype or tuple(data.shape) != tuple(record.shape):
            problems.append(f"array {array_name}: stored {data.dtype}{list(data.shape)}, index says {record.dtype}{list(record.shape)}")
        elif array_sha256(data) != record.sha256:
            problems.append(f"array {array_name}: content sha256 differs from index.json")
        else:
            problems += _check_values(array_name, data, index, manifest)
    problems += _check_tables(root, folder, index)
    return problems, index.sample_ids


def _check_commit(root: Storage, name: str) -> list[str]:
    """Object stores: index.json is the one the commit object names (a local rename commits the folder whole)."""
    if root.is_local:
        return []
    record = root.commit_record(name)
    index = root.read_bytes(f"{shard_dir(name)}/{INDEX_FILE}")
    if hashlib.sha256(index).hexdigest() != record.get("index_sha256"):
        return [f"file {INDEX_FILE}: sha256 differs from its commit object (corrupted or replaced)"]
    return []


def _check_files(root: Storage, folder: str, recorded: dict[str, str]) -> list[str]:
    problems = []
    present = set(root.list_files(folder)) - {INDEX_FILE}
    for rel in sorted(set(recorded) - present):
        problems.append(f"file {rel} is missing")
    for rel in sorted(present - set(recorded)):
        problems.append(f"file {rel} is not listed in index.json")
    for rel in sorted(present & set(recorded)):
        if root.sha256(f"{folder}/{rel}") != recorded[rel]:
            problems.append(f"file {rel}: sha256 differs from index.json (corrupted)")
    return problems


def _check_values(name: str, data: np.ndarray, index, manifest: CacheManifest) -> list[str]:
    if name in ("offsets", "question_offsets"):
        counts = index.num_tokens if name == "offsets" else index.num_question_tokens
        expected = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        return [] if np.array_equal(data, expected) else [f"array {name}: does not match the token counts in index.json"]
    if name in ("target_ids", "topk_ids") and data.size:
        if data.min() < 0 or data.max() >= manifest.teacher.vocab_size:
            return [f"array {name}: ids outside [0, {manifest.teacher.vocab_size})"]
    return []


def _check_tables(root: Storage, folder: str, index) -> list[str]:
    problems = []
    for filename, ids in ((SAMPLES_FILE, index.sample_ids), (REJECTS_FILE, index.rejected_ids)):
        try:
            table = read_table(root, f"{folder}/{filename}")
        except Exception as err:
            problems.append(f"{filename}: unreadable ({err})")
            continue
        if tuple(table.column("sample_id").to_pylist()) != tuple(ids):
            problems.append(f"{filename}: sample ids differ from index.json")
    return problems


def _progress(items: list, enabled: bool):
    bar = progress_bar(len(items), "verify", unit="shard", enabled=enabled)
    for item in items:
        yield item
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
