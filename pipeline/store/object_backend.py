"""The object-store backend (s3://, gs://, az://) on obstore, chosen by measurement (bench/results/store_client.md).

A shard is written into a local temporary folder by the same code as on a local disk, then uploaded under
shards/<name>/ (a name only its writer uses: writer id, sequence number, random suffix), index.json last,
and committed by creating commits/<name>.json. Readers list commits/ only, so objects of a shard
without its commit object are never read as data (schemas/COMMIT.md).

Clients are built lazily in each process (DataLoader workers get their own after a fork); the options that
hold credentials stay in memory and are scrubbed from every error message.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from schemas import COMMIT_SUFFIX, COMMITS_DIR, INDEX_FILE, SHARDS_DIR
from pipeline.store.storage import Storage, WriterLock
from pipeline.store.local_cache import LocalCache, download_once, publish
from pipeline.store.object_errors import ObjectErrors

UPLOAD_THREADS = 8
CLIENT_OPTIONS = {"allow_http", "allow_invalid_certificates", "connect_timeout", "http1_only", "http2_only",
                  "pool_idle_timeout", "pool_max_idle_per_host", "proxy_url", "read_timeout", "timeout", "user_agent"}
# a wrong endpoint must fail in seconds, not after obstore's default 3 minutes of retries; a busy server or a
# dropped connection still gets six tries over about six seconds
RETRY = {"max_retries": 6, "retry_timeout": timedelta(seconds=60),
         "backoff": {"init_backoff": timedelta(milliseconds=100), "max_backoff": timedelta(seconds=4), "base": 2}}


class ObjectStorage(Storage):
    is_local = False

    def __init__(self, url: str, options: dict[str, str]):
        self.location = url.rstrip("/")
        self._options = {**_s3_environment(), **options} if url.lower().startswith(("s3://", "s3a://")) else options
        self._errors = ObjectErrors(self.location, self._options)
        self._store = None
        self._pid = None
        self._zarr = None
        self._downloads: dict[str, Path] = {}
        self.local_cache = LocalCache.current()  # --cache-dir-local as set when opened; travels to workers

    def __getstate__(self):  # clients are per process; options travel to DataLoader workers (memory only)
        state = self.__dict__.copy()
        state.update(_store=None, _pid=None, _zarr=None)
        return state

    def __repr__(self) -> str:
        return f"ObjectStorage({self.location!r})"

    @property
    def store(self):
        if self._store is None or self._pid != os.getpid():
            self._store, self._zarr, self._pid = self._connect(), None, os.getpid()
        return self._store

    def _connect(self):
        from obstore.store import from_url

        client = {k: v for k, v in self._options.items() if k in CLIENT_OPTIONS}
        config = {k: v for k, v in self._options.items() if k not in CLIENT_OPTIONS}
        endpoint = config.get("endpoint") or config.get("aws_endpoint") or config.get("endpoint_url")
        if endpoint and endpoint.startswith("http://"):
            client.setdefault("allow_http", True)  # the user named a plain-http endpoint (a local server)
        with self._errors.context("connect"):
            return from_url(self.location, config=config or None, client_options=client or None, retry_config=RETRY)

    # -- whole objects -------------------------------------------------------------------------------------
    def read_bytes(self, rel: str) -> bytes:
        import obstore

        with self._errors.context("read", rel):
            return bytes(obstore.get(self.store, rel).bytes())

    def read_range(self, rel: str, start: int, end: int) -> bytes:
        import obstore

        with self._errors.context("read", rel):
            return bytes(obstore.get_range(self.store, rel, start=start, end=end))

    def exists(self, rel: str) -> bool:
        return self.file_size(rel) is not None

    def file_size(self, rel: str) -> int | None:
        import obstore

        try:
            with self._errors.context("head", rel):
                return int(obstore.head(self.store, rel)["size"])
        except FileNotFoundError:
            return None

    def write_atomic(self, rel: str, data: bytes) -> None:
        import obstore

        with self._errors.context("write", rel):
            obstore.put(self.store, rel, data)  # a PUT is atomic: readers see the old object or the new one

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        return self.put_if(rel, data, "create") is not None

    def put_if(self, rel: str, data: bytes, mode) -> str | None:
        """PUT with a precondition ("create": If-None-Match, {"e_tag": ...}: If-Match); the new ETag, or None when
        the precondition failed."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            with self._errors.context("write", rel):
                return obstore.put(self.store, rel, data, mode=mode)["e_tag"]
        except (AlreadyExistsError, PreconditionError):
            return None

    def read_with_meta(self, rel: str) -> tuple[bytes, str, float]:
        """(content, ETag, last-modified time in seconds) from one GET, so that all three belong together."""
        import obstore

        with self._errors.context("read", rel):
            result = obstore.get(self.store, rel)
            meta = result.meta
            return bytes(result.bytes()), meta["e_tag"], meta["last_modified"].timestamp()

    def head(self, rel: str) -> dict | None:
        import obstore

        try:
            with self._errors.context("head", rel):
                return obstore.head(self.store, rel)
        except FileNotFoundError:
            return None

    def delete(self, rels: list[str]) -> None:
        import obstore

        for start in range(0, len(rels), 1000):  # S3's DeleteObjects takes at most 1000 keys
            with self._errors.context("delete", rels[start]):
                obstore.delete(self.store, rels[start:start + 1000])

    def upload_file(self, local: Path, rel: str) -> None:
        import obstore

        with self._errors.context("write", rel):
            obstore.put(self.store, rel, Path(local))  # multipart above obstore's chunk size

    @contextmanager
    def writing_file(self, rel: str):
        folder = Path(tempfile.mkdtemp(prefix="genrecal-upload-"))
        try:
            path = folder / Path(rel).name
            yield path
            self.upload_file(path, rel)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    @contextmanager
    def writing_folder(self, rel: str):
        if self.list_files(rel):
            yield None
            return
        folder = Path(tempfile.mkdtemp(prefix="genrecal-upload-"))
        try:
            yield folder
            self._upload_tree(folder, rel, [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()])
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _upload_tree(self, folder: Path, rel: str, files: list[str]) -> None:
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:  # obstore releases the GIL: uploads overlap
            list(pool.map(lambda f: self.upload_file(folder / f, f"{rel}/{f}"), files))

    def local_path(self, rel: str, sha256: str | None = None) -> Path:
        return download_once(self, rel, sha256)

    @contextmanager
    def local_shard(self, name: str, files: list[str]):
        """A local folder holding `files` of shard `name` (paths relative to it): fetched whole, one GET per
        object, in parallel; kept in --cache-dir-local when set (a committed shard never changes), else removed
        after use."""
        kept = self.local_cache.shard_folder(self.location, name)
        if kept is not None and all((kept / f).is_file() for f in files):
            self.local_cache.touch(kept)
            yield kept
            return
        if kept is not None:
            kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=kept.parent if kept is not None else None))
        try:
            self._download_tree(f"{SHARDS_DIR}/{name}", files, tmp)
            if kept is None:
                yield tmp
                return
            shutil.rmtree(kept, ignore_errors=True)  # a copy made for fewer arrays (read_layers=False)
            publish(tmp, kept)
            self.local_cache.evict(keep=kept)
            yield kept
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _download_tree(self, rel: str, files: list[str], folder: Path) -> None:
        def fetch(name: str) -> None:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(self.read_bytes(f"{rel}/{name}"))

        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:  # the GETs overlap: a shard costs about one round trip
            list(pool.map(fetch, files))

    def local_folder(self, rel: str) -> Path:
        if rel not in self._downloads:
            folder = Path(tempfile.mkdtemp(prefix="genrecal-download-"))
            atexit.register(shutil.rmtree, folder, True)
            for name in self.list_files(rel):
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(self.read_bytes(f"{rel}/{name}"))
            self._downloads[rel] = folder
        return self._downloads[rel]

    # -- listing and sizes ---------------------------------------------------------------------------------
    def list_files(self, rel: str) -> dict[str, int]:
        import obstore

        prefix = rel.rstrip("/") + "/" if rel else None
        out = {}
        with self._errors.context("list", rel or "/"):
            for chunk in obstore.list(self.store, prefix, chunk_size=1000):
                for meta in chunk:
                    out[meta["path"][len(prefix or ""):]] = int(meta["size"])
        return dict(sorted(out.items()))

    def child_folders(self, rel: str) -> list[str]:
        import obstore

        with self._errors.context("list", rel):
            listed = obstore.list_with_delimiter(self.store, rel.rstrip("/") + "/")
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in listed["common_prefixes"])

    def sha256(self, rel: str) -> str:
        import obstore

        h = hashlib.sha256()
        with self._errors.context("read", rel):
            for chunk in obstore.get(self.store, rel).stream(min_chunk_size=1 << 20):
                h.update(chunk)
        return h.hexdigest()

    # -- zarr and Parquet ----------------------------------------------------------------------------------
    def open_zarr_group(self, rel: str, mode: str = "r"):
        import zarr
        from zarr.storage import ObjectStore

        store = self.store
        if self._zarr is None:
            self._zarr = ObjectStore(store, read_only=True)  # shards are written locally and uploaded
        with self._errors.context("read", rel):
            return zarr.open_group(store=self._zarr, path=rel, mode=mode, zarr_format=3)

    def read_table(self, rel: str):
        import pyarrow as pa
        import pyarrow.parquet as pq

        # bytes in memory, then Arrow: pyarrow's own S3FileSystem would ignore AWS_ENDPOINT_URL
        return pq.read_table(pa.BufferReader(self.read_bytes(rel)))

    # -- shards: the commit protocol -----------------------------------------------------------------------
    def committed_shards(self) -> list[str]:
        names = self.list_files(COMMITS_DIR)
        return sorted(n[: -len(COMMIT_SUFFIX)] for n in names if n.endswith(COMMIT_SUFFIX) and "/" not in n)

    def uncommitted_shards(self) -> list[str]:
        committed = set(self.committed_shards())
        return [n for n in self.child_folders(SHARDS_DIR) if n not in committed]

    def begin_shard(self, writer_id: str, suffix: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=f"genrecal-shard-{writer_id}-{suffix}-"))

    def commit_shard(self, folder: Path, name: str) -> None:
        """Upload every file (index.json last), then create the commit object: the commit point."""
        rel = f"{SHARDS_DIR}/{name}"
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
        self._upload_tree(folder, rel, [f for f in files if f != INDEX_FILE])
        index = (folder / INDEX_FILE).read_bytes()
        self.write_atomic(f"{rel}/{INDEX_FILE}", index)
        record = {"shard": name, "index_sha256": hashlib.sha256(index).hexdigest()}
        if not self.create_exclusive(commit_object(name), json.dumps(record).encode()):
            raise RuntimeError(f"{self.location}: shard {name} is committed already (two writers with one name?)")
        shutil.rmtree(folder, ignore_errors=True)

    def commit_record(self, name: str) -> dict:
        return json.loads(self.read_bytes(commit_object(name)))

    def discard_shard(self, folder: Path) -> None:
        shutil.rmtree(folder, ignore_errors=True)  # uploaded objects stay invisible; the rerun removes them

    def remove_leftovers(self, writer_id: str) -> None:
        for name in self.uncommitted_shards():
            if name.split("-")[0] == writer_id:  # names are <writer>-<seq>-<rand>; ids hold no '-'
                self.delete([f"{SHARDS_DIR}/{name}/{f}" for f in self.list_files(f"{SHARDS_DIR}/{name}")])

    def lock_writer(self, writer_id: str) -> WriterLock:
        from pipeline.store.object_lock import LeaseLock

        return LeaseLock(self, writer_id)

    def check_access(self, write: bool) -> None:
        """One LIST (and with `write` one PUT and DELETE): a missing bucket, refused credentials or an
        unreachable endpoint fail here, before any model loads."""
        import obstore

        with self._errors.context("list", "/"):
            next(iter(obstore.list(self.store, None, chunk_size=1)), None)
        if write:
            probe = f".access-probe-{os.urandom(4).hex()}"
            self.write_atomic(probe, b"")
            self.delete([probe])


# environment -> obstore S3 config, read once when a storage is opened: a DataLoader worker started by
# forkserver has the environment of the moment the fork server started, not the parent's of now
S3_ENVIRONMENT = {"AWS_ENDPOINT_URL": "endpoint", "AWS_ENDPOINT": "endpoint", "AWS_ACCESS_KEY_ID": "access_key_id",
                  "AWS_SECRET_ACCESS_KEY": "secret_access_key", "AWS_SESSION_TOKEN": "token",
                  "AWS_DEFAULT_REGION": "region", "AWS_REGION": "region"}


def _s3_environment() -> dict[str, str]:
    out = {}
    for name, key in S3_ENVIRONMENT.items():  # later names win: AWS_REGION over AWS_DEFAULT_REGION
        if os.environ.get(name):
            out[key] = os.environ[name]
    return out


def commit_object(name: str) -> str:
    return f"{COMMITS_DIR}/{name}{COMMIT_SUFFIX}"
