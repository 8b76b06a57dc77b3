"""CacheReader: random access by sample id and bounded-memory iteration over a teacher cache.

    reader = CacheReader("cache/")
    sample = reader.get("easy-vqa:train:17")     # or reader[i], i in shard order
    feats = sample.features_float32()              # [n, d]; sample.features holds the stored bits
    for sample in reader:                          # shard order, reads blocks of samples
        ...

Only committed shards are visible. The reader holds paths and small indexes; zarr
handles are opened lazily per process, so it pickles into DataLoader workers.
"""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa

from schemas import HEAD_FILE, REJECT_COLUMNS, REJECTS_FILE, SAMPLE_COLUMNS, SAMPLES_FILE, CacheManifest, read_manifest
from pipeline.store.encoding import decode_features
from pipeline.store.layout import committed_shards, load_index, shard_dir
from pipeline.store.shard_files import arrow_schema, open_arrays, read_table

TOKEN_ARRAYS = ("target_ids", "features", "feature_scales", "logsumexp", "topk_ids", "topk_logprobs", "tail_logmass")
QUESTION_ARRAYS = ("question_features", "question_feature_scales")


@dataclass
class CachedSample:
    """One sample's teacher arrays as stored (features in their encoded form)."""

    sample_id: str
    shard: str
    row: int
    encoding: str
    target_ids: np.ndarray  # [n] int32
    features: np.ndarray  # [n, d] stored payload (uint16 bf16 bits, uint8 fp8, int8)
    logsumexp: np.ndarray  # [n] float32
    feature_scales: np.ndarray | None = None  # [n] float32, lossy encodings only
    topk_ids: np.ndarray | None = None  # [n, k] int32
    topk_logprobs: np.ndarray | None = None  # [n, k]
    tail_logmass: np.ndarray | None = None  # [n] float32
    question_features: np.ndarray | None = None  # [q, d] payload; None when not stored
    question_feature_scales: np.ndarray | None = None

    def features_float32(self) -> np.ndarray:
        return decode_features(self.features, self.feature_scales, self.encoding)

    def question_features_float32(self) -> np.ndarray | None:
        if self.question_features is None:
            return None
        return decode_features(self.question_features, self.question_feature_scales, self.encoding)

    def features_torch(self):
        """Features as a torch tensor: bf16 without a copy for bf16 caches, float32 otherwise."""
        import torch

        if self.encoding == "bf16":
            return torch.from_numpy(np.ascontiguousarray(self.features).view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(self.features_float32())


class CacheReader:
    """Read-only view of the committed shards of one cache folder."""

    def __init__(self, cache_dir: str | Path, max_open_shards: int = 8):
        self.root = Path(cache_dir)
        self.manifest: CacheManifest = read_manifest(self.root)
        self.shards = committed_shards(self.root)
        self.indexes = {name: load_index(self.root, name, self.manifest) for name in self.shards}
        self.max_open_shards = max_open_shards
        self._locations: dict[str, tuple[str, int]] = {}
        self._order: list[str] = []
        self.duplicates: list[tuple[str, str]] = []  # (sample id, shard whose copy is ignored)
        self.rejected_ids: set[str] = set()
        for name in self.shards:
            index = self.indexes[name]
            self.rejected_ids.update(index.rejected_ids)
            for row, sid in enumerate(index.sample_ids):
                if sid in self._locations:
                    self.duplicates.append((sid, name))
                    continue
                self._locations[sid] = (name, row)
                self._order.append(sid)
        if self.duplicates:
            warnings.warn(
                f"{self.root}: {len(self.duplicates)} sample id(s) appear in more than one shard "
                f"(e.g. {self.duplicates[0][0]!r}); the first copy in shard order is used",
                stacklevel=2,
            )
        self._open: OrderedDict[str, tuple[dict, np.ndarray, np.ndarray]] = OrderedDict()
        self._tables: OrderedDict[str, pa.Table] = OrderedDict()  # sample tables of recently used shards

    # -- sizes and ids ----------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._order)

    @property
    def sample_ids(self) -> list[str]:
        return list(self._order)

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._locations

    def num_tokens(self, sample_id: str) -> int:
        name, row = self._locations[sample_id]
        return self.indexes[name].num_tokens[row]

    # -- random access -----------------------------------------------------------------
    def __getitem__(self, i: int) -> CachedSample:
        return self.get(self._order[i])

    def get(self, sample_id: str) -> CachedSample:
        try:
            name, row = self._locations[sample_id]
        except KeyError:
            raise KeyError(f"sample {sample_id!r} is not in the cache at {self.root}") from None
        return self._read_rows(name, row, row + 1)[0]

    # -- sequential access -------------------------------------------------------------
    def __iter__(self) -> Iterator[CachedSample]:
        for name in self.shards:
            yield from self.iter_shard(name)

    def iter_shard(self, name: str, block_tokens: int = 4096) -> Iterator[CachedSample]:
        """Samples of one shard in row order, reading about `block_tokens` positions at a time."""
        index = self.indexes[name]
        start, tokens = 0, 0
        for row, n in enumerate(index.num_tokens):
            tokens += n
            if tokens >= block_tokens or row == len(index.num_tokens) - 1:
                for sample in self._read_rows(name, start, row + 1):
                    if self._locations.get(sample.sample_id) == (name, sample.row):
                        yield sample
                start, tokens = row + 1, 0

    def _read_rows(self, name: str, first: int, last: int) -> list[CachedSample]:
        arrays, offsets, qoffsets = self._arrays(name)
        t0, t1 = int(offsets[first]), int(offsets[last])
        q0, q1 = int(qoffsets[first]), int(qoffsets[last])
        block = {k: arrays[k][t0:t1] for k in TOKEN_ARRAYS if k in arrays}
        qblock = {k: arrays[k][q0:q1] for k in QUESTION_ARRAYS if k in arrays}
        ids = self.indexes[name].sample_ids
        out = []
        for row in range(first, last):
            a, b = int(offsets[row]) - t0, int(offsets[row + 1]) - t0
            qa, qb = int(qoffsets[row]) - q0, int(qoffsets[row + 1]) - q0
            fields = {k: v[a:b] for k, v in block.items()}
            if qb > qa:
                fields.update({k: v[qa:qb] for k, v in qblock.items()})
            out.append(
                CachedSample(sample_id=ids[row], shard=name, row=row, encoding=self.manifest.features.encoding, **fields)
            )
        return out

    def _arrays(self, name: str):
        """Open zarr arrays of a shard (kept in a small LRU) plus its offsets."""
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        arrays = open_arrays(shard_dir(self.root, name))
        entry = (arrays, arrays["offsets"][:], arrays["question_offsets"][:])
        self._open[name] = entry
        if len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return entry

    # -- tables and head ---------------------------------------------------------------
    def sample_table(self) -> pa.Table:
        """The sample table of every committed shard (duplicates not removed)."""
        return _concat([read_table(shard_dir(self.root, n) / SAMPLES_FILE) for n in self.shards], SAMPLE_COLUMNS)

    def rejects_table(self) -> pa.Table:
        return _concat([read_table(shard_dir(self.root, n) / REJECTS_FILE) for n in self.shards], REJECT_COLUMNS)

    def sample_meta(self, sample_id: str) -> dict:
        """The sample-table row of one sample, with `messages` parsed from JSON."""
        name, row = self._locations[sample_id]
        if name not in self._tables:
            self._tables[name] = read_table(shard_dir(self.root, name) / SAMPLES_FILE)
            if len(self._tables) > self.max_open_shards:
                self._tables.popitem(last=False)
        row_dict = self._tables[name].slice(row, 1).to_pylist()[0]
        row_dict["messages"] = json.loads(row_dict["messages"])
        return row_dict

    def head_path(self) -> Path:
        return self.root / HEAD_FILE

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # zarr handles are per process
        state["_tables"] = OrderedDict()
        return state


def _concat(tables: list[pa.Table], columns) -> pa.Table:
    return pa.concat_tables(tables) if tables else arrow_schema(columns).empty_table()
