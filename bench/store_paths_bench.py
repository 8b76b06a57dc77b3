"""The local-folder store paths alone, timed in ms: write 600 synthetic samples (d=256, 4 shards), write the
teacher head, open a reader, 200 random `get`, every sample by `get_from_block`, verify, inspect.

    python bench/store_paths_bench.py      # ~10 s; one line; run it alternately on two checkouts to compare
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import random, shutil, sys, tempfile, time
from pathlib import Path
from tests.synthetic import SyntheticTeacher, synthetic_manifest
from pipeline.store.writer import CacheWriter
from pipeline.store.reader import CacheReader
from pipeline.store.teacher_head import write_teacher_head
from pipeline.store.verify import verify_cache
from pipeline.store.inspect_cache import cache_summary

root = Path(tempfile.mkdtemp()) / "c"
t = SyntheticTeacher(256, 2000, seed=0)
m = synthetic_manifest(hidden_size=256, vocab_size=2000, k=16, shard_target_tokens=2048, chunk_tokens=64)
ids = [f"s{i:04d}" for i in range(600)]
samples = list(t.samples(ids, m.topk.k, question_every=3))
out = {}
t0 = time.perf_counter()
with CacheWriter(root, m, "w0", background=False) as w:
    for s in samples: w.add(s)
out["write 600 samples"] = time.perf_counter() - t0
t0 = time.perf_counter(); write_teacher_head(root, t.head); out["head"] = time.perf_counter() - t0
t0 = time.perf_counter(); r = CacheReader(root); out["open reader"] = time.perf_counter() - t0
order = random.Random(0).sample(ids, 200)
t0 = time.perf_counter()
for sid in order: r.get(sid)
out["200 random get"] = time.perf_counter() - t0
r2 = CacheReader(root)
t0 = time.perf_counter()
for sid in r2.sample_ids: r2.get_from_block(sid)
out["600 block get"] = time.perf_counter() - t0
t0 = time.perf_counter(); assert verify_cache(root).ok; out["verify"] = time.perf_counter() - t0
t0 = time.perf_counter(); cache_summary(root); out["inspect"] = time.perf_counter() - t0
print(" ".join(f"{k}={v*1000:.0f}" for k, v in out.items()), f"shards={len(r.shards)}")
shutil.rmtree(root.parent)
