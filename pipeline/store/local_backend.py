"""The local-folder backend: a cache on a local disk or a shared POSIX file system (NFS, Lustre, GPFS).

A shard is filled in shards/.tmp-<writer>-<rand>, every file fsynced, then renamed to shards/<name>: the
rename is the commit. Writers exclude each other with flock on locks/<writer>.lock, which the kernel drops
when a process dies. These are the store's original code paths, unchanged; zarr opens the folder by path.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from schemas import LOCKS_DIR, SHARDS_DIR, TMP_PREFIX
from pipeline.store.storage import Storage, StorageError, WriterLock
from pipeline.store.fsutil import create_exclusive, fsync_dir, fsync_tree, sha256_file, write_atomic


class LocalStorage(Storage):
    is_local = True

    def __init__(self, root: Path):
        self.root = Path(root)
        self.location = str(self.root)

    def path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    # -- whole files ---------------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        return self.path(rel).read_bytes()

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        with open(self.path(rel), "rb") as f:
            f.seek(start)
            return f.read(end - start)

    def exists(self, rel: str) -> bool:
        return self.path(rel).exists()

    def write_atomic(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        return create_exclusive(path, data)

    @contextmanager
    def writing_file(self, rel: str):
        path = self.path(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{os.urandom(4).hex()}-{path.name}")
        try:
            yield tmp
            os.replace(tmp, path)
            fsync_dir(path.parent)
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def writing_folder(self, rel: str):
        final = self.path(rel)
        if final.exists():
            yield None
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}-{os.urandom(3).hex()}")
        try:
            yield tmp
            try:
                os.rename(tmp, final)
            except OSError:  # another worker published the same folder first
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def local_path(self, rel: str, sha256: str | None = None) -> Path:
        return self.path(rel)

    def local_folder(self, rel: str) -> Path:
        return self.path(rel)

    # -- listing and sizes ---------------------------------------------------------------------------------
    def list_files(self, rel: str) -> dict[str, int]:
        root = self.path(rel)
        if not root.is_dir():
            return {}
        return {str(p.relative_to(root)): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}

    def file_size(self, rel: str) -> int | None:
        path = self.path(rel)
        return path.stat().st_size if path.is_file() else None

    def sha256(self, rel: str) -> str:
        return sha256_file(self.path(rel))

    # -- zarr and Parquet ----------------------------------------------------------------------------------
    def open_zarr_group(self, rel: str, mode: str = "r"):
        import zarr

        return zarr.open_group(str(self.path(rel)), mode=mode, zarr_format=3)

    def read_table(self, rel: str):
        import pyarrow.parquet as pq

        return pq.read_table(self.path(rel))

    # -- shards --------------------------------------------------------------------------------------------
    def committed_shards(self) -> list[str]:
        shards = self.path(SHARDS_DIR)
        if not shards.is_dir():
            return []
        return sorted(p.name for p in shards.iterdir() if p.is_dir() and not p.name.startswith("."))

    def uncommitted_shards(self) -> list[str]:
        shards = self.path(SHARDS_DIR)
        if not shards.is_dir():
            return []
        return sorted(p.name for p in shards.iterdir() if p.name.startswith(TMP_PREFIX))

    def begin_shard(self, writer_id: str, suffix: str) -> Path:
        tmp = self.path(SHARDS_DIR) / f"{TMP_PREFIX}{writer_id}-{suffix}"  # same file system: rename commits
        tmp.mkdir(parents=True)
        return tmp

    def commit_shard(self, folder: Path, name: str) -> None:
        """The commit point: one rename of a complete, flushed folder."""
        fsync_tree(folder)
        final = self.path(SHARDS_DIR) / name
        os.rename(folder, final)
        fsync_dir(final.parent)

    def discard_shard(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)

    def remove_leftovers(self, writer_id: str) -> None:
        for tmp in self.path(SHARDS_DIR).glob(f"{TMP_PREFIX}{writer_id}-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def lock_writer(self, writer_id: str) -> WriterLock:
        return FlockLock(self.root, writer_id)

    def check_access(self, write: bool) -> None:
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.root}: not a folder")


class FlockLock(WriterLock):
    """locks/<writer>.lock held with flock: the kernel drops it when the process dies."""

    def __init__(self, root: Path, writer_id: str):
        locks = root / LOCKS_DIR
        locks.mkdir(parents=True, exist_ok=True)
        path = locks / f"{writer_id}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(
                f"writer {writer_id!r} is already running on {root} (lock {path} is held); "
                "give each worker its own --worker-index"
            ) from None
        self._fd: int | None = fd

    def check(self) -> None:
        pass  # a held flock cannot be lost

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock
            self._fd = None
