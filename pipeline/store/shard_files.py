"""Write one shard folder (always on a local disk: an object store gets it uploaded) and read its arrays.

    shards/<name>/index.json        ShardIndex
    shards/<name>/samples.parquet   sample table rows of this shard
    shards/<name>/rejects.parquet   samples refused while this shard was filled
    shards/<name>/arrays/           Zarr v3 group of ragged arrays

Each array is stored with zarr's sharding codec as one file per array, cut into
inner chunks of `chunk_tokens` rows: few files on the file system, and a random
read of one sample decodes only the chunks it touches. Every inner chunk ends with
a crc32c checksum, so a flipped byte fails the read instead of returning wrong numbers.
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from schemas import (
    ARRAYS_DIR,
    CODEC_NAMES,
    INDEX_FILE,
    REJECT_COLUMNS,
    REJECTS_FILE,
    SAMPLE_COLUMNS,
    SAMPLES_FILE,
    ArrayRecord,
    CacheManifest,
    ShardIndex,
    array_spec,
)
from pipeline.store.fsutil import dir_bytes, files_under, sha256_file

CODEC_PRESETS = {
    "none": lambda: [],
    "zstd1": lambda: [ZstdCodec(level=1)],
    "zstd3": lambda: [ZstdCodec(level=3)],
    "blosc-zstd3-shuffle": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle="shuffle")],
    "blosc-zstd3-bitshuffle": lambda: [BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")],
    "blosc-lz4-bitshuffle": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")],
}

assert set(CODEC_PRESETS) == set(CODEC_NAMES), "every codec name of schemas has exactly one preset"

_ARROW_TYPES = {"string": pa.string(), "int32": pa.int32(), "list<string>": pa.list_(pa.string())}


def arrow_schema(columns) -> pa.Schema:
    return pa.schema([(name, _ARROW_TYPES[kind]) for name, kind, _ in columns])


def write_shard(
    folder: Path,
    name: str,
    writer_id: str,
    manifest: CacheManifest,
    arrays: dict[str, np.ndarray],
    samples: list[dict],
    rejects: list[dict],
) -> ShardIndex:
    """Fill `folder` (a fresh temporary folder) with one complete shard; return its index.

    The caller commits it through its Storage (a rename, or an upload and a commit object); nothing here is
    visible to readers.
    """
    group = zarr.open_group(str(folder / ARRAYS_DIR), mode="w", zarr_format=3)
    records = {}
    for array_name, data in arrays.items():
        _write_array(group, array_name, data, manifest)
        records[array_name] = ArrayRecord(
            dtype=str(data.dtype),
            shape=tuple(int(s) for s in data.shape),
            sha256=array_sha256(data),
            stored_bytes=dir_bytes(folder / ARRAYS_DIR / array_name),
        )
    for row, sample in enumerate(samples):
        sample.update(shard=name, row=row)
    _write_table(folder / SAMPLES_FILE, samples, SAMPLE_COLUMNS)
    _write_table(folder / REJECTS_FILE, rejects, REJECT_COLUMNS)
    index = ShardIndex(
        name=name,
        writer_id=writer_id,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        sample_ids=tuple(s["sample_id"] for s in samples),
        num_tokens=tuple(s["num_tokens"] for s in samples),
        num_question_tokens=tuple(s["num_question_tokens"] for s in samples),
        rejected_ids=tuple(r["sample_id"] for r in rejects),
        arrays=records,
        files={str(p): sha256_file(folder / p) for p in files_under(folder)},
        format_version=manifest.format_version,
    )
    index.check_against(manifest, f"shard {name} (being written)")
    (folder / INDEX_FILE).write_text(json.dumps(index.to_dict(), indent=1))
    return index


def _write_array(group: zarr.Group, name: str, data: np.ndarray, manifest: CacheManifest) -> None:
    storage = manifest.storage
    codec_name = storage.codecs[array_spec(name).group]
    rows = storage.chunk_tokens
    chunks = (rows,) + data.shape[1:]
    shards = (max(1, math.ceil(data.shape[0] / rows)) * rows,) + data.shape[1:]
    array = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=chunks,
        shards=shards,
        compressors=CODEC_PRESETS[codec_name]() + [Crc32cCodec()],
        fill_value=0,
    )
    if data.size:
        array[...] = data


def _write_table(path: Path, rows: list[dict], columns) -> None:
    schema = arrow_schema(columns)
    table = pa.Table.from_pylist([{c: r[c] for c in schema.names} for r in rows], schema=schema)
    pq.write_table(table, path, compression="zstd")


def array_sha256(data: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(data).reshape(-1).view(np.uint8)).hexdigest()


def open_arrays(storage, folder: str) -> dict[str, zarr.Array]:
    """The arrays of the shard at `folder` (relative to the cache root of `storage`)."""
    group = storage.open_zarr_group(f"{folder}/{ARRAYS_DIR}", mode="r")
    return {name: group[name] for name in group.array_keys()}


def read_whole_arrays(storage, folder: str, skip: frozenset[str] = frozenset()) -> dict[str, np.ndarray]:
    """Every array of one shard folder but those named in `skip`, read whole: one zarr read per array instead of
    one per array per sample."""
    return {name: array[...] for name, array in open_arrays(storage, folder).items() if name not in skip}


def read_table(storage, rel: str) -> pa.Table:
    return storage.read_table(rel)
