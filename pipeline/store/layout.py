"""Where things are in a cache folder, and loading of the small metadata files.

    cache/
      manifest.json                 CacheManifest
      teacher/head.safetensors      teacher head (weight [vocab, d], optional bias)
      teacher/...                   config, tokenizer files, chat template
      shards/<writer>-<seq>-<rand>/ committed shards (zarr group + index.json + Parquet)
      shards/.tmp-<writer>-<rand>/  a shard being written: ignored by readers
      locks/<writer>.lock           held (flock) while a writer runs
      images/<2 hex>/<sha256>.png   pixels of in-memory images (sample-table refs "sha256:<hex>")
      responses/<writer>.jsonl      teacher-written answers of a --responses generate dump
"""

from __future__ import annotations

from pathlib import Path

from schemas import (
    INDEX_FILE,
    MANIFEST_FILE,
    SHARDS_DIR,
    TMP_PREFIX,
    CacheFormatError,
    CacheManifest,
    ShardIndex,
    read_json,
    read_manifest,
)


def committed_shards(root: Path) -> list[str]:
    """Names of committed shards, sorted (so grouped by writer, then in commit order)."""
    shards = Path(root) / SHARDS_DIR
    if not shards.is_dir():
        return []
    return sorted(p.name for p in shards.iterdir() if p.is_dir() and not p.name.startswith("."))


def temporary_shards(root: Path) -> list[str]:
    shards = Path(root) / SHARDS_DIR
    if not shards.is_dir():
        return []
    return sorted(p.name for p in shards.iterdir() if p.name.startswith(TMP_PREFIX))


def shard_dir(root: Path, name: str) -> Path:
    return Path(root) / SHARDS_DIR / name


def load_index(root: Path, name: str, manifest: CacheManifest) -> ShardIndex:
    """Read and validate one shard's index.json against the cache manifest."""
    path = shard_dir(root, name) / INDEX_FILE
    index = ShardIndex.from_dict(read_json(path), str(path))
    if index.name != name:
        raise CacheFormatError(f"{path}: field 'name' is {index.name!r} but the folder is {name!r}")
    index.check_against(manifest, str(path))
    return index


def committed_sample_ids(root: Path, manifest: CacheManifest | None = None) -> set[str]:
    """Every sample id stored or rejected by a committed shard (empty for a cache not created yet).

    The one scan for finished work: the writer (resume) and the dump's vLLM phase (which runs before
    a writer can be opened) both call it. Every index is validated against `manifest` (default: the
    cache's own manifest.json).
    """
    root = Path(root)
    if manifest is None:
        if not (root / MANIFEST_FILE).exists():
            return set()
        manifest = read_manifest(root)
    done: set[str] = set()
    for name in committed_shards(root):
        index = load_index(root, name, manifest)
        done.update(index.sample_ids, index.rejected_ids)
    return done
