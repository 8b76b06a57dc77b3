"""A local disk cache of what is downloaded from an object store (`--cache-dir-local`, `--cache-dir-local-bytes`).

- Single files (the teacher head) are kept under a content key: the sha256 the cache records beside them, or
  else the object's URL and ETag. A download is checked against that sha256 and appears under its key by
  rename only once complete, so a run never uses a partial or a changed file.
- Whole shards are kept under the cache's URL and the shard's name: a committed shard never changes (its
  name is unique and its commit object is written once). They are bounded in bytes: the least recently used
  go first. Without a folder, shards are read from a temporary copy and not kept.

The settings are taken when an ObjectStorage is opened and travel with it (pickled into DataLoader workers
that start by forkserver), so workers share the parent's folder and bound.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_LIMIT = 20 << 30
SHARDS = "shards"
_folder: Path | None = None  # what --cache-dir-local set in this process
_limit = DEFAULT_LIMIT
_temporary: Path | None = None  # this process's folder for single files when no --cache-dir-local is given


def set_local_cache_dir(folder: str | Path | None) -> None:
    global _folder
    _folder = Path(folder) if folder else None


def set_local_cache_limit(limit: int | None) -> None:
    global _limit
    _limit = DEFAULT_LIMIT if limit is None else int(limit)


@dataclass(frozen=True)
class LocalCache:
    folder: Path | None  # None: single files go to a temporary folder, shards are not kept
    limit: int = DEFAULT_LIMIT  # bytes of whole shards

    @classmethod
    def current(cls) -> "LocalCache":
        return cls(_folder, _limit)

    def files_folder(self) -> Path:
        global _temporary
        if self.folder is not None:
            return self.folder
        if _temporary is None:
            _temporary = Path(tempfile.mkdtemp(prefix="genrecal-local-cache-"))
            atexit.register(shutil.rmtree, _temporary, True)
        return _temporary

    def shard_folder(self, location: str, name: str) -> Path | None:
        """Where shard `name` of the cache at `location` is kept (None: shards are not kept)."""
        if self.folder is None:
            return None
        key = hashlib.sha256(location.encode()).hexdigest()[:16]
        return self.folder / SHARDS / key / name

    def touch(self, folder: Path) -> None:
        os.utime(folder)  # the folder's mtime is its last use: eviction goes oldest first

    def evict(self, keep: Path) -> None:
        """Remove the least recently used shards until they fit the bound (never `keep`, the one just used)."""
        if self.folder is None:
            return
        shards = [p for p in (self.folder / SHARDS).glob("*/*") if p.is_dir() and not p.name.startswith(".")]
        sizes = {p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) for p in shards}
        total = sum(sizes.values())
        for path in sorted(shards, key=lambda p: p.stat().st_mtime):
            if total <= self.limit:
                break
            if path != keep:
                shutil.rmtree(path, ignore_errors=True)
                total -= sizes[path]


def download_once(storage, rel: str, sha256: str | None = None) -> Path:
    """A local file holding object `rel` of `storage`, downloaded only when no copy under its key exists."""
    if sha256:
        key = f"sha256-{sha256}"
    else:
        meta = storage.head(rel)
        if meta is None:
            raise FileNotFoundError(f"{storage.location}/{rel}: not found")
        key = hashlib.sha256(f"{storage.location}/{rel}@{meta.get('e_tag')}".encode()).hexdigest()[:32]
    target = storage.local_cache.files_folder() / "files" / key / Path(rel).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{os.getpid()}-{os.urandom(4).hex()}")
    try:
        tmp.write_bytes(storage.read_bytes(rel))
        if sha256 and (got := _sha256(tmp)) != sha256:
            raise ValueError(f"{storage.location}/{rel}: downloaded sha256 {got[:12]}... differs from the recorded "
                             f"{sha256[:12]}...; the object is corrupted or was replaced")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def publish(tmp: Path, target: Path) -> Path:
    """Move a complete download into place (another process may have put the same shard there first)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
