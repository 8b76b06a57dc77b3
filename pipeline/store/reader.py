"""CacheReader: random access by sample id and bounded-memory iteration over a teacher cache.

    reader = CacheReader("cache/")
    sample = reader.get("easy-vqa:train:17")     # or reader[i], i in shard order
    feats = sample.features_float32()              # [n, d]; sample.features holds the stored bits
    mid = sample.layer_features_float32(8)         # [n, d] of layer 8, when the cache has --layers (format 2)
    same = reader.get_from_block("easy-vqa:train:17")  # its whole shard read into memory (an LRU of a few shards)
    for sample in reader:                          # shard order, reads blocks of samples
        ...

A random read costs one zarr read per array (about 2 ms each, 7-9 arrays); `get_from_block` reads
a whole shard once (one read per array) and cuts every later sample of that shard from memory,
which is what a shard-ordered trainer wants (student/batches.py `ShardWindowSampler`).

Only committed shards are visible. The cache may be a folder or an object-store URL (s3://, gs://, az://);
the reader holds its Storage and small indexes; zarr handles, clients and shard blocks are opened lazily
per process, so it pickles into DataLoader workers.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa

from schemas import (
    ARRAYS_DIR,
    HEAD_FILE,
    REJECT_COLUMNS,
    REJECTS_FILE,
    SAMPLE_COLUMNS,
    SAMPLES_FILE,
    CacheManifest,
    layer_array_names,
    require_layers,
)
from pipeline.store.encoding import decode_features
from pipeline.store.backend import open_storage
from pipeline.store.layout import load_index, read_cache_manifest, shard_dir
from pipeline.store.shard_files import arrow_schema, open_arrays, read_table, read_whole_arrays

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
    layer_features: dict[int, np.ndarray] | None = None  # layer -> [n, d] payload (rows of `features`); None: no layers
    layer_feature_scales: dict[int, np.ndarray] | None = None  # layer -> [n] float32, lossy encodings only

    def features_float32(self) -> np.ndarray:
        return decode_features(self.features, self.feature_scales, self.encoding)

    def layer_features_float32(self, layer: int) -> np.ndarray:
        """[n, d] float32 features of intermediate layer `layer` (a layer of the cache's manifest)."""
        if not self.layer_features or layer not in self.layer_features:
            have = sorted(self.layer_features or ())
            raise KeyError(f"sample {self.sample_id!r}: no layer {layer} in the cache (it has layers {have or 'none'}; "
                           "see schemas.require_layers)")
        scales = self.layer_feature_scales.get(layer) if self.layer_feature_scales else None
        return decode_features(self.layer_features[layer], scales, self.encoding)

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


@dataclass
class RowBlock:
    """The arrays of rows [first, first + rows) of one shard, in memory."""

    shard: str
    first: int
    offsets: np.ndarray  # [rows + 1] start of each row in the token arrays
    question_offsets: np.ndarray  # [rows + 1] start of each row in the question arrays
    tokens: dict[str, np.ndarray]  # TOKEN_ARRAYS present in the shard
    questions: dict[str, np.ndarray]  # QUESTION_ARRAYS present in the shard

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (*self.tokens.values(), *self.questions.values()))


class CacheReader:
    """Read-only view of the committed shards of one cache folder."""

    def __init__(self, cache_dir, max_open_shards: int = 8, max_block_shards: int = 4,
                 read_layers: bool = True):
        """`cache_dir`: a folder, an object-store URL or an open Storage. `read_layers` False: samples come
        without their intermediate layer features (not read at all; for the methods that do not use them, on a
        cache that holds them)."""
        self.storage = open_storage(cache_dir)
        self.root = self.storage.root if self.storage.is_local else self.storage.location  # a Path for folders
        self.manifest: CacheManifest = read_cache_manifest(self.storage)
        self.layers: tuple[int, ...] = tuple(self.manifest.layers)  # intermediate layers stored (format 2)
        self.read_layers = read_layers
        layer_names = {name: (layer, kind) for layer in self.layers
                       for kind, name in zip(("features", "scales"), layer_array_names(layer))}
        self._layer_names = layer_names if read_layers else {}
        self._skipped = frozenset() if read_layers else frozenset(layer_names)
        self._token_arrays = TOKEN_ARRAYS + tuple(self._layer_names)
        self.shards = self.storage.committed_shards()
        self.indexes = {name: load_index(self.storage, name, self.manifest) for name in self.shards}
        self.max_open_shards = max_open_shards
        self.max_block_shards = max_block_shards  # whole shards held in memory by get_from_block
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
        self._blocks: OrderedDict[str, RowBlock] = OrderedDict()  # whole shards of get_from_block
        self.shard_reads = 0  # whole-shard reads so far (a shard read again was evicted from the LRU)
        self._pid = os.getpid()

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

    def location(self, sample_id: str) -> tuple[str, int]:
        """(shard name, row) of the copy of `sample_id` that the reader serves."""
        try:
            return self._locations[sample_id]
        except KeyError:
            raise KeyError(f"sample {sample_id!r} is not in the cache at {self.root}") from None

    # -- random access -----------------------------------------------------------------
    def __getitem__(self, i: int) -> CachedSample:
        return self.get(self._order[i])

    def get(self, sample_id: str) -> CachedSample:
        """One sample, reading only the chunks it touches (one zarr read per array)."""
        name, row = self.location(sample_id)
        return self._read_rows(name, row, row + 1)[0]

    # -- block access ------------------------------------------------------------------
    def get_from_block(self, sample_id: str) -> CachedSample:
        """The same sample as `get`, cut from its whole shard held in memory.

        The first request for a shard reads all its arrays at once; the last `max_block_shards`
        shards stay in memory, so samples asked for in shard order cost no zarr read. The arrays
        returned are copies: holding a sample never pins its shard in memory.
        """
        name, row = self.location(sample_id)
        return self._cut(self.shard_block(name), row, copy=True)

    def shard_block(self, name: str) -> RowBlock:
        """Every row of shard `name` in memory (kept in an LRU of `max_block_shards` shards)."""
        self._own_process()
        if name in self._blocks:
            self._blocks.move_to_end(name)
            return self._blocks[name]
        block = self._read_whole_shard(name)
        self._blocks[name] = block
        while len(self._blocks) > max(self.max_block_shards, 1):
            self._blocks.popitem(last=False)
        return block

    def _read_whole_shard(self, name: str) -> RowBlock:
        if self.storage.is_local:
            arrays = read_whole_arrays(self.storage, shard_dir(name), self._skipped)
        else:  # the shard's objects fetched whole and in parallel, then read like a folder
            skipped = tuple(f"{ARRAYS_DIR}/{a}/" for a in self._skipped)
            files = [f for f in self.indexes[name].files if f.startswith(f"{ARRAYS_DIR}/") and not f.startswith(skipped)]
            with self.storage.local_shard(name, files) as folder:
                arrays = read_whole_arrays(open_storage(folder.parent), folder.name, self._skipped)
        self.shard_reads += 1
        offsets, qoffsets = arrays["offsets"].astype(np.int64), arrays["question_offsets"].astype(np.int64)
        rows = len(self.indexes[name].sample_ids)
        if len(offsets) != rows + 1 or len(qoffsets) != rows + 1:
            raise ValueError(f"{self.root}/{shard_dir(name)}: offsets hold {len(offsets) - 1} rows but the index "
                             f"lists {rows} samples; run `pipeline verify` on the cache")
        return RowBlock(name, 0, offsets, qoffsets, {k: arrays[k] for k in self._token_arrays if k in arrays},
                        {k: arrays[k] for k in QUESTION_ARRAYS if k in arrays})

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
        """Rows [first, last) of a shard: one zarr read per array covering just those rows."""
        arrays, offsets, qoffsets = self._arrays(name)
        t0, t1 = int(offsets[first]), int(offsets[last])
        q0, q1 = int(qoffsets[first]), int(qoffsets[last])
        block = RowBlock(
            name, first, offsets[first : last + 1].astype(np.int64) - t0, qoffsets[first : last + 1].astype(np.int64) - q0,
            {k: arrays[k][t0:t1] for k in self._token_arrays if k in arrays},
            {k: arrays[k][q0:q1] for k in QUESTION_ARRAYS if k in arrays},
        )
        return [self._cut(block, row, copy=False) for row in range(first, last)]

    def _cut(self, block: RowBlock, row: int, copy: bool) -> CachedSample:
        """Sample `row` of the shard from a block holding it (views of the block unless `copy`)."""
        i = row - block.first
        a, b = int(block.offsets[i]), int(block.offsets[i + 1])
        qa, qb = int(block.question_offsets[i]), int(block.question_offsets[i + 1])
        fields = {k: v[a:b] for k, v in block.tokens.items()}
        if qb > qa:
            fields.update({k: v[qa:qb] for k, v in block.questions.items()})
        if copy:
            fields = {k: v.copy() for k, v in fields.items()}
        if self._layer_names:
            layers: dict[str, dict[int, np.ndarray]] = {"features": {}, "scales": {}}
            for name in self._layer_names:
                if name in fields:
                    layer, kind = self._layer_names[name]
                    layers[kind][layer] = fields.pop(name)
            fields["layer_features"] = layers["features"]
            fields["layer_feature_scales"] = layers["scales"] or None
        sample_id = self.indexes[block.shard].sample_ids[row]
        return CachedSample(sample_id=sample_id, shard=block.shard, row=row, encoding=self.manifest.features.encoding,
                            **fields)

    def _arrays(self, name: str):
        """Open zarr arrays of a shard (kept in a small LRU) plus its offsets."""
        self._own_process()
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        arrays = open_arrays(self.storage, shard_dir(name))
        entry = (arrays, arrays["offsets"][:], arrays["question_offsets"][:])
        self._open[name] = entry
        if len(self._open) > self.max_open_shards:
            self._open.popitem(last=False)
        return entry

    # -- tables and head ---------------------------------------------------------------
    def sample_table(self) -> pa.Table:
        """The sample table of every committed shard (duplicates not removed)."""
        return _concat([read_table(self.storage, f"{shard_dir(n)}/{SAMPLES_FILE}") for n in self.shards], SAMPLE_COLUMNS)

    def rejects_table(self) -> pa.Table:
        return _concat([read_table(self.storage, f"{shard_dir(n)}/{REJECTS_FILE}") for n in self.shards], REJECT_COLUMNS)

    def sample_meta(self, sample_id: str) -> dict:
        """The sample-table row of one sample, with `messages` parsed from JSON."""
        name, row = self._locations[sample_id]
        self._own_process()
        if name not in self._tables:
            self._tables[name] = read_table(self.storage, f"{shard_dir(name)}/{SAMPLES_FILE}")
            if len(self._tables) > self.max_open_shards:
                self._tables.popitem(last=False)
        row_dict = self._tables[name].slice(row, 1).to_pylist()[0]
        row_dict["messages"] = json.loads(row_dict["messages"])
        return row_dict

    def require_layers(self, wanted: tuple[int, ...] | None = None) -> tuple[int, ...]:
        """`schemas.require_layers` for this cache: its layers (or `wanted`), else a ValueError saying what to do."""
        return require_layers(self.manifest, wanted, str(self.root))

    def head_path(self):
        """A local path of the teacher head file (downloaded once from an object store)."""
        return self.storage.local_path(HEAD_FILE)

    @property
    def worker_start_method(self) -> str | None:
        """How DataLoader workers over this reader must start: None (the default, fork) for a folder; "forkserver"
        for an object store, whose client (obstore's tokio runtime) hangs in a forked child once the parent used it."""
        return None if self.storage.is_local else "forkserver"

    def _own_process(self) -> None:
        """Drop handles made in another process: a forked DataLoader worker inherits the parent's zarr arrays,
        whose object-store client (a tokio runtime) does not survive a fork."""
        if self._pid != os.getpid():
            self._open, self._tables, self._blocks = OrderedDict(), OrderedDict(), OrderedDict()
            self._pid = os.getpid()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # zarr handles are per process
        state["_tables"] = OrderedDict()
        state["_blocks"] = OrderedDict()  # each worker reads the shards it needs
        return state


def _concat(tables: list[pa.Table], columns) -> pa.Table:
    return pa.concat_tables(tables) if tables else arrow_schema(columns).empty_table()
