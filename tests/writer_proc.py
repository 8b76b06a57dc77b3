"""A writer process for the crash and concurrency tests.

    python tests/writer_proc.py CACHE WRITER_ID FIRST LAST [--hang-in-commit N]

Writes synthetic samples s{FIRST}..s{LAST-1} (skipping those already in the cache),
like a resumed dump would. With --hang-in-commit N it prints IN_COMMIT and sleeps
inside the N-th shard commit, after the shard's files are written to the temporary
folder and before the rename, so the test can SIGKILL it mid-shard.
"""

import sys
import time

import pipeline.store.writer as writer_module
from tests.synthetic import SyntheticTeacher, synthetic_manifest
from pipeline.store.writer import CacheWriter


def main(argv):
    cache, writer_id, first, last = argv[0], argv[1], int(argv[2]), int(argv[3])
    hang_at = int(argv[argv.index("--hang-in-commit") + 1]) if "--hang-in-commit" in argv else None
    commits = 0
    real_commit = writer_module._commit_folder

    def commit_or_hang(tmp, final):
        nonlocal commits
        commits += 1
        if commits == hang_at:
            print("IN_COMMIT", tmp, flush=True)
            time.sleep(600)
        real_commit(tmp, final)

    writer_module._commit_folder = commit_or_hang
    teacher = SyntheticTeacher(64, 500, seed=0)
    manifest = synthetic_manifest()
    with CacheWriter(cache, manifest, writer_id, background=True) as writer:
        todo = [f"s{i:04d}" for i in range(first, last) if f"s{i:04d}" not in writer.done_ids]
        for sample in teacher.samples(todo, manifest.topk.k, question_every=3):
            writer.add(sample)
    print("DONE", len(todo), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
