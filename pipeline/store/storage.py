"""The interface every cache file operation goes through (`Storage`), and its errors; the backends are
local_backend.py (folders) and object_backend.py (s3://, gs://, az://); backend.py picks one for a location."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path

URL_PATTERN = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class StorageError(ValueError):
    """A cache location cannot be used: unknown scheme, missing extra, missing bucket, refused credentials.

    The message names the location (the URL, never a credential) and what to do."""


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and bool(URL_PATTERN.match(location))


class WriterLock(ABC):
    """Held while one writer id writes into a cache; `close` releases it."""

    @abstractmethod
    def check(self) -> None:
        """Raise if the lock was lost (an object-store lease taken over), so no shard is committed without it."""

    @abstractmethod
    def close(self) -> None: ...


class Storage(ABC):
    """Every file operation the store makes, on paths relative to the cache root ("shards/x/index.json")."""

    location: str  # the folder or the URL: what the manifest, messages and errors show
    is_local: bool

    # -- whole objects -------------------------------------------------------------------------------------
    @abstractmethod
    def read_bytes(self, rel: str) -> bytes:
        """The whole file; FileNotFoundError when absent."""

    @abstractmethod
    def read_range(self, rel: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a file."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def write_atomic(self, rel: str, data: bytes) -> None:
        """Replace `rel` by `data` so that a reader sees the old or the new content, never a part."""

    @abstractmethod
    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create `rel` only if it does not exist, atomically; False if it existed (first writer wins)."""

    @abstractmethod
    def writing_file(self, rel: str) -> AbstractContextManager[Path]:
        """A local file path to fill; on a clean exit it becomes `rel` atomically (kept if `rel` appeared meanwhile)."""

    @abstractmethod
    def writing_folder(self, rel: str) -> AbstractContextManager[Path | None]:
        """A local folder to fill, published as `rel` on exit; None when `rel` exists already (nothing to do)."""

    @abstractmethod
    def local_path(self, rel: str, sha256: str | None = None) -> Path:
        """A local path holding `rel` (object stores: downloaded once into the local cache, checked against
        `sha256` when given)."""

    @abstractmethod
    def local_folder(self, rel: str) -> Path:
        """A local folder holding every file below `rel` (object stores: downloaded)."""

    # -- listing and sizes ---------------------------------------------------------------------------------
    @abstractmethod
    def list_files(self, rel: str) -> dict[str, int]:
        """Every file below folder `rel`: path relative to `rel` -> size in bytes, sorted by path."""

    def tree_bytes(self, rel: str = "") -> int:
        return sum(self.list_files(rel).values())

    @abstractmethod
    def file_size(self, rel: str) -> int | None:
        """Size of a file, None when absent."""

    @abstractmethod
    def sha256(self, rel: str) -> str: ...

    # -- zarr and Parquet ----------------------------------------------------------------------------------
    @abstractmethod
    def open_zarr_group(self, rel: str, mode: str = "r"):
        """The zarr v3 group at folder `rel`."""

    @abstractmethod
    def read_table(self, rel: str):
        """A Parquet file as a pyarrow Table."""

    # -- shards: the commit protocol (schemas/COMMIT.md) ---------------------------------------------------
    @abstractmethod
    def committed_shards(self) -> list[str]:
        """Names of committed shards, sorted (grouped by writer, then in commit order)."""

    @abstractmethod
    def uncommitted_shards(self) -> list[str]:
        """What writers left or are writing (never read as data): shown by verify and inspect."""

    @abstractmethod
    def begin_shard(self, writer_id: str, suffix: str) -> Path:
        """A fresh local folder for one shard's files (committed by `commit_shard`)."""

    @abstractmethod
    def commit_shard(self, folder: Path, name: str) -> None:
        """Make the complete shard in `folder` visible as shards/<name>: the commit point."""

    @abstractmethod
    def discard_shard(self, folder: Path) -> None:
        """Remove a shard folder that will not be committed (the writer failed)."""

    @abstractmethod
    def remove_leftovers(self, writer_id: str) -> None:
        """Remove what a killed writer with this id left uncommitted (only that id's: others may be running)."""

    @abstractmethod
    def lock_writer(self, writer_id: str) -> WriterLock:
        """Exclude every other writer with the same id; RuntimeError when one is running."""

    @abstractmethod
    def check_access(self, write: bool) -> None:
        """Raise StorageError naming the problem (missing bucket, refused credentials, unreachable endpoint)."""

    def __str__(self) -> str:
        return self.location
