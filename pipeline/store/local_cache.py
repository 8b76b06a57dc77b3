"""A local disk cache of objects downloaded from an object store (`--cache-dir-local`).

Files are kept under a content key: the sha256 the caller knows (the teacher head's, from the manifest) or
else the object's URL and ETag, so a changed object is downloaded again and an unchanged one never is.
Each download is checked against the sha256 when one is given, and appears under its key by rename only
once complete. Without `set_local_cache_dir` a temporary folder of this process is used and removed at exit.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_LIMIT = 20 << 30
_dir: Path | None = None
_limit = DEFAULT_LIMIT  # bytes of whole shards kept (the head and other files keyed by sha256 are not counted)


def set_local_cache_dir(folder: str | Path | None) -> None:
    """Where downloads are kept between runs (None: a temporary folder of this process)."""
    global _dir
    _dir = Path(folder) if folder else None


def set_local_cache_limit(limit: int | None) -> None:
    global _limit
    _limit = DEFAULT_LIMIT if limit is None else int(limit)


def local_cache_dir() -> Path:
    global _dir
    if _dir is None:
        _dir = Path(tempfile.mkdtemp(prefix="genrecal-local-cache-"))
        atexit.register(shutil.rmtree, _dir, True)
    _dir.mkdir(parents=True, exist_ok=True)
    return _dir


def download_once(storage, rel: str, sha256: str | None = None) -> Path:
    """A local file holding object `rel` of `storage`, downloaded only when no copy under its key exists."""
    if sha256:
        key = f"sha256-{sha256}"
    else:
        meta = storage.head(rel)
        if meta is None:
            raise FileNotFoundError(f"{storage.location}/{rel}: not found")
        key = hashlib.sha256(f"{storage.location}/{rel}@{meta.get('e_tag')}".encode()).hexdigest()[:32]
    target = local_cache_dir() / key / Path(rel).name
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()
