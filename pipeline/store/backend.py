"""Where a cache lives: one interface for every file operation of the store, two backends.

    storage = open_storage("cache/")                     # LocalStorage: a folder (the default)
    storage = open_storage("s3://bucket/prefix")         # ObjectStorage: s3:// gs:// az:// through obstore
    storage.read_bytes("manifest.json")

The writer, reader, verify, inspect and the teacher-head code call a `Storage` for every file operation,
so each backend keeps its own commit protocol (schemas/COMMIT.md):
- local folders commit a shard by renaming a flushed folder and exclude writers with flock (fsutil.py);
- object stores have neither: a shard's objects go under a name only its writer uses, then a small
  commit object is written last; writers exclude each other with a conditional create (If-None-Match).

Credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_*, AZURE_*) or from
`--storage-option KEY=VALUE`, which the CLIs hand to `set_storage_options`. They are held in memory only:
`location` (what the manifest, logs and errors show) is the URL alone.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from contextlib import AbstractContextManager
from pathlib import Path

URL_PATTERN = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

# URL scheme -> the pip extra that brings its client (all three are obstore today; the names say what a user
# asks for, so a later per-cloud dependency does not change the command they were told)
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
          "azure": "azure", "memory": "s3"}

_process_options: dict[str, str] = {}  # --storage-option values of this process (never written anywhere)


class StorageError(ValueError):
    """A cache location cannot be used: unknown scheme, missing extra, missing bucket, refused credentials.

    The message names the location (the URL, never a credential) and what to do."""


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and bool(URL_PATTERN.match(location))


def set_storage_options(options: dict[str, str]) -> None:
    """Options every later `open_storage` of this process uses (the CLIs' --storage-option)."""
    _process_options.clear()
    _process_options.update(options)


def parse_storage_options(pairs) -> dict[str, str]:
    """["KEY=VALUE", ...] -> {key: value}; keys are lower-cased (obstore's config names)."""
    out = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise StorageError(f"--storage-option takes KEY=VALUE, not {pair.split('=')[0]!r}=...")
        out[key.strip().lower()] = value
    return out


def open_storage(location, options: dict[str, str] | None = None) -> "Storage":
    """The storage of a cache: a Storage as is, a URL through the object-store backend, else a local folder."""
    if isinstance(location, Storage):
        return location
    if not is_url(location):
        from pipeline.store.local_backend import LocalStorage

        return LocalStorage(Path(location))
    scheme = str(location).split("://", 1)[0].lower()
    if scheme == "file":
        from pipeline.store.local_backend import LocalStorage

        return LocalStorage(Path(str(location)[len("file://"):]))
    if scheme not in EXTRAS:
        raise StorageError(f"{location}: unknown storage scheme {scheme}://; use a folder, s3://, gs:// or az://")
    try:
        import obstore  # noqa: F401
    except ImportError:
        extra = EXTRAS[scheme]
        raise StorageError(f"{location}: object storage needs the optional extra; install it with "
                           f"pip install 'genrecal[{extra}]'") from None
    from pipeline.store.object_backend import ObjectStorage

    return ObjectStorage(str(location), dict(_process_options if options is None else options))


def location_of(location) -> str:
    """How a cache location is shown (the URL or the folder); never opens anything."""
    return location.location if isinstance(location, Storage) else str(location)


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
