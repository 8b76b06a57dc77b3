"""Copy a cache folder into another storage (a bucket) so that it is committed there as a dump would commit it:
manifest and teacher files first, then every committed shard through the target's own commit protocol
(for a bucket: its objects, then its commit object; schemas/COMMIT.md). Temporary shard folders, locks and
response logs are not copied.

    copy_cache("cache/", "s3://bucket/cache")
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from schemas import IMAGES_DIR, MANIFEST_FILE, SHARDS_DIR, TEACHER_DIR
from pipeline.store.backend import open_storage


def copy_cache(source, target) -> list[str]:
    """Copy the committed content of folder cache `source` into `target`; returns the shard names copied."""
    src, dst = open_storage(source), open_storage(target)
    if not src.is_local or dst.is_local:
        raise ValueError(f"copy_cache copies from a folder into a bucket, not {src.location} -> {dst.location}")
    for rel in (TEACHER_DIR, IMAGES_DIR):
        for name in src.list_files(rel):
            with dst.writing_file(f"{rel}/{name}") as tmp:
                shutil.copyfile(src.path(f"{rel}/{name}"), tmp)
    names = src.committed_shards()
    done = set(dst.committed_shards())
    for name in names:
        if name in done:
            continue
        staging = Path(tempfile.mkdtemp(prefix="genrecal-copy-"))
        folder = staging / name
        shutil.copytree(src.path(f"{SHARDS_DIR}/{name}"), folder)
        dst.commit_shard(folder, name)
        shutil.rmtree(staging, ignore_errors=True)
    dst.create_exclusive(MANIFEST_FILE, src.read_bytes(MANIFEST_FILE))  # last: a manifest means a usable cache
    return names
