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

import json
import os
from pathlib import Path

from pipeline.store.storage import Storage, StorageError, is_url

# URL scheme -> the pip extra that brings its client (all three are obstore today; the names say what a user
# asks for, so a later per-cloud dependency does not change the command they were told)
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure",
          "azure": "azure"}

OPTIONS_ENV = "GENRECAL_STORAGE_OPTIONS"  # how a child process of a dump (the vLLM phase) gets them: its environment
# --storage-option values of this process (never written anywhere)
_process_options: dict[str, str] = json.loads(os.environ.get(OPTIONS_ENV) or "{}")

__all__ = ["EXTRAS", "Storage", "StorageError", "is_url", "location_of", "open_storage", "parse_storage_options",
           "set_storage_options", "storage_options_env"]


def set_storage_options(options: dict[str, str]) -> None:
    """Options every later `open_storage` of this process uses (the CLIs' --storage-option)."""
    _process_options.clear()
    _process_options.update(options)


def storage_options_env() -> dict[str, str]:
    """The environment entry that hands this process's options to a child process (empty when there are none)."""
    return {OPTIONS_ENV: json.dumps(_process_options)} if _process_options else {}


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
