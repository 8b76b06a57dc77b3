"""One writer per id on an object store: a lease object created with a conditional PUT.

locks/<writer>.lock is created with If-None-Match: * (only one creator wins) and renewed every quarter of its
lease with If-Match on its own ETag, so a second writer with the same id is refused while the first runs.
An object store has no flock that dies with its process, so a lock left by a killed writer is taken over
(If-Match on the stale ETag: one taker wins) when its holder is a dead process on this host, or when it has
not been renewed for a whole lease (another host; allow for clock skew). A writer that loses its lease
stops before its next commit (`check`).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from schemas import LOCKS_DIR
from pipeline.store.storage import WriterLock

LEASE_S = 60.0


class LeaseLock(WriterLock):
    def __init__(self, storage, writer_id: str, lease_s: float = LEASE_S):
        self.storage, self.writer_id, self.lease_s = storage, writer_id, lease_s
        self.rel = f"{LOCKS_DIR}/{writer_id}.lock"
        self._etag = storage.put_if(self.rel, self._body(), "create") or self._take_over()
        self._renewed = time.monotonic()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease-{writer_id}", daemon=True)
        self._thread.start()

    def _body(self) -> bytes:
        return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "renewed_at": time.time(),
                           "lease_s": self.lease_s}).encode()

    def _take_over(self) -> str:
        """The ETag of our lock after replacing a stale one; RuntimeError while its holder lives."""
        for _ in range(3):  # the lock may vanish or change between our reads: look again
            try:
                data, etag, modified = self.storage.read_with_meta(self.rel)
            except FileNotFoundError:
                if new := self.storage.put_if(self.rel, self._body(), "create"):
                    return new
                continue
            holder = {"renewed_at": modified, **_parse(data)}
            if not self._stale(holder):
                raise RuntimeError(
                    f"writer {self.writer_id!r} is already running on {self.storage.location} (lock {self.rel} held "
                    f"by pid {holder.get('pid')} on {holder.get('host')}, renewed {time.time() - holder.get('renewed_at', 0):.0f} s ago); "
                    "give each worker its own --worker-index"
                )
            if new := self.storage.put_if(self.rel, self._body(), {"e_tag": etag}):
                return new
        raise RuntimeError(f"{self.storage.location}: lock {self.rel} keeps changing; is writer {self.writer_id!r} "
                           "being started twice?")

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"])
        return time.time() - float(holder.get("renewed_at", 0)) > float(holder.get("lease_s", self.lease_s))

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                etag = self.storage.put_if(self.rel, self._body(), {"e_tag": self._etag})
            except Exception:  # a network hiccup: try again next period; `check` stops us if it lasts
                continue
            if etag is None:
                self._lost = "another process took it over"
                return
            self._etag, self._renewed = etag, time.monotonic()

    def check(self) -> None:
        if self._lost is None and time.monotonic() - self._renewed > self.lease_s * 0.75:
            self._lost = f"not renewed for {time.monotonic() - self._renewed:.0f} s"
        if self._lost:
            raise RuntimeError(f"writer {self.writer_id!r} lost its lock {self.rel} on {self.storage.location} "
                               f"({self._lost}); stopping before another commit")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._lost is None:
            meta = self.storage.head(self.rel)
            if meta is not None and meta.get("e_tag") == self._etag:  # still ours (no conditional DELETE on S3)
                self.storage.delete([self.rel])


def _parse(data: bytes) -> dict:
    try:
        holder = json.loads(data)
        return holder if isinstance(holder, dict) else {}
    except ValueError:
        return {}  # a lock we cannot read: stale a lease after it was written


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
