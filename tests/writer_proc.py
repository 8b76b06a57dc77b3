"""A writer process for the crash and concurrency tests.

    python tests/writer_proc.py CACHE WRITER_ID FIRST LAST [--hang-in-commit N]

Writes synthetic samples s{FIRST}..s{LAST-1} (skipping those already in the cache),
like a resumed dump would. CACHE is a folder or an s3:// URL (endpoint and credentials from
the environment). With --hang-in-commit N it prints IN_COMMIT and sleeps inside the N-th shard
commit, so the test can SIGKILL it mid-shard: on a folder after the shard's files are written to
the temporary folder and before the rename; on an object store after half of the shard's objects
are uploaded and before the rest and the commit object.
"""

import sys
import time

from schemas import SHARDS_DIR
from tests.synthetic import SyntheticTeacher, synthetic_manifest
from pipeline.store.writer import CacheWriter


def hang_in_commit(storage, hang_at: int) -> None:
    """Make the `hang_at`-th commit of `storage` stop half-way (this instance only)."""
    commits = 0
    real_commit = storage.commit_shard

    def commit_or_hang(folder, name):
        nonlocal commits
        commits += 1
        if commits == hang_at:
            if not storage.is_local:  # some objects uploaded, the rest and the commit object not
                files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
                storage._upload_tree(folder, f"{SHARDS_DIR}/{name}", files[: len(files) // 2])
            print("IN_COMMIT", folder, flush=True)
            time.sleep(600)
        real_commit(folder, name)

    storage.commit_shard = commit_or_hang


def main(argv):
    cache, writer_id, first, last = argv[0], argv[1], int(argv[2]), int(argv[3])
    hang_at = int(argv[argv.index("--hang-in-commit") + 1]) if "--hang-in-commit" in argv else None
    teacher = SyntheticTeacher(64, 500, seed=0)
    manifest = synthetic_manifest()
    with CacheWriter(cache, manifest, writer_id, background=True) as writer:
        if hang_at is not None:
            hang_in_commit(writer.storage, hang_at)
        todo = [f"s{i:04d}" for i in range(first, last) if f"s{i:04d}" not in writer.done_ids]
        for sample in teacher.samples(todo, manifest.topk.k, question_every=3):
            writer.add(sample)
    print("DONE", len(todo), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
