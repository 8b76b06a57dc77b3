"""Where things are in a cache, and loading of the small metadata files, through the cache's Storage.

    cache/
      manifest.json                 CacheManifest
      teacher/head.safetensors      teacher head (weight [vocab, d], optional bias)
      teacher/...                   config, tokenizer files, chat template
      shards/<writer>-<seq>-<rand>/ committed shards (zarr group + index.json + Parquet)
      shards/.tmp-<writer>-<rand>/  local folders: a shard being written, ignored by readers
      commits/<name>.json           object stores: the commit object of shard <name> (schemas/COMMIT.md)
      locks/<writer>.lock           held while a writer runs (flock; an object store: a lease)
      images/<2 hex>/<sha256>.png   pixels of in-memory images (sample-table refs "sha256:<hex>")
      responses/<writer>.jsonl      teacher-written answers of a --responses generate dump

Every function takes a cache location (folder, URL) or an open Storage; paths inside are relative strings.
"""

from __future__ import annotations

import json

from schemas import INDEX_FILE, MANIFEST_FILE, SHARDS_DIR, CacheFormatError, CacheManifest, ShardIndex
from pipeline.store.backend import Storage, open_storage


def shard_dir(name: str) -> str:
    """The folder of shard `name`, relative to the cache root."""
    return f"{SHARDS_DIR}/{name}"


def committed_shards(cache) -> list[str]:
    """Names of committed shards, sorted (so grouped by writer, then in commit order)."""
    return open_storage(cache).committed_shards()


def temporary_shards(cache) -> list[str]:
    """Shards being written or left by a killed writer (never read as data)."""
    return open_storage(cache).uncommitted_shards()


def read_json_file(storage: Storage, rel: str):
    where = f"{storage.location}/{rel}"
    try:
        text = storage.read_bytes(rel)
    except FileNotFoundError:
        raise CacheFormatError(f"{where}: file not found; is this a cache folder?") from None
    try:
        return json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CacheFormatError(f"{where}: not valid JSON ({err})") from None


def read_cache_manifest(cache) -> CacheManifest:
    storage = open_storage(cache)
    return CacheManifest.from_dict(read_json_file(storage, MANIFEST_FILE), f"{storage.location}/{MANIFEST_FILE}")


def load_index(cache, name: str, manifest: CacheManifest) -> ShardIndex:
    """Read and validate one shard's index.json against the cache manifest."""
    storage = open_storage(cache)
    rel = f"{shard_dir(name)}/{INDEX_FILE}"
    where = f"{storage.location}/{rel}"
    index = ShardIndex.from_dict(read_json_file(storage, rel), where)
    if index.name != name:
        raise CacheFormatError(f"{where}: field 'name' is {index.name!r} but the folder is {name!r}")
    index.check_against(manifest, where)
    return index


def committed_sample_ids(cache, manifest: CacheManifest | None = None) -> set[str]:
    """Every sample id stored or rejected by a committed shard (empty for a cache not created yet).

    The one scan for finished work: the writer (resume) and the dump's vLLM phase (which runs before
    a writer can be opened) both call it. Every index is validated against `manifest` (default: the
    cache's own manifest.json).
    """
    storage = open_storage(cache)
    if manifest is None:
        if not storage.exists(MANIFEST_FILE):
            return set()
        manifest = read_cache_manifest(storage)
    done: set[str] = set()
    for name in storage.committed_shards():
        index = load_index(storage, name, manifest)
        done.update(index.sample_ids, index.rejected_ids)
    return done
