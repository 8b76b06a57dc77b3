"""Which object-store client the cache uses: zarr 3.1's FsspecStore (s3fs) against its ObjectStore (obstore).

    python bench/store_client_bench.py            # ~1-2 min on 2 cores; prints a table, writes nothing

One real shard (synthetic teacher, d=512, 400 samples, top-64, a third with question features; written by
CacheWriter on a local disk) is uploaded to a moto S3 server on 127.0.0.1, then each client, through zarr,
does what the cache does:
- upload: every file of the shard (8 in parallel);
- block read: open the shard's group and read every array whole (a training block read);
- random read: one sample (one zarr read per array: shard-index suffix read + 1-2 chunk range reads);
- small objects: GET of index.json, and a LIST of the shard's files.
Each at 0 ms and 30 ms of added latency per request (moto itself adds ~1-3 ms). Best of 3 repeats.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BUCKET = "genrecal-bench"
LATENCIES = (0.0, 0.03)
REPEATS = 3


def make_shard(folder: Path) -> Path:
    from pipeline.store.writer import CacheWriter
    from tests.synthetic import SyntheticTeacher, synthetic_manifest

    teacher = SyntheticTeacher(hidden_size=512, vocab_size=4000, seed=0)
    manifest = synthetic_manifest(hidden_size=512, vocab_size=4000, k=64, shard_target_tokens=1 << 30, chunk_tokens=256)
    samples = list(teacher.samples([f"s{i:04d}" for i in range(400)], manifest.topk.k, question_every=3))
    with CacheWriter(folder, manifest, "w0", background=False) as writer:
        for s in samples:
            writer.add(s)
    (shard,) = [p for p in (folder / "shards").iterdir() if not p.name.startswith(".")]
    return shard


class Obstore:
    name = "ObjectStore (obstore 0.12)"

    def __init__(self, prefix: str):
        from obstore.store import from_url

        self.store = from_url(f"s3://{BUCKET}/{prefix}", client_options={"allow_http": True})

    def upload(self, folder: Path, files: list[str]) -> None:
        import obstore

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda f: obstore.put(self.store, f, folder / f), files))

    def zarr_group(self):
        import zarr
        from zarr.storage import ObjectStore

        return zarr.open_group(store=ObjectStore(self.store, read_only=True), path="arrays", mode="r", zarr_format=3)

    def get(self, rel: str) -> bytes:
        import obstore

        return bytes(obstore.get(self.store, rel).bytes())

    def list(self) -> int:
        import obstore

        return sum(len(chunk) for chunk in obstore.list(self.store, None, chunk_size=1000))


class Fsspec:
    name = "FsspecStore (s3fs)"

    def __init__(self, prefix: str):
        import s3fs

        self.root = f"{BUCKET}/{prefix}"
        self.fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        self.afs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"], asynchronous=True)

    def upload(self, folder: Path, files: list[str]) -> None:
        self.fs.put([str(folder / f) for f in files], [f"{self.root}/{f}" for f in files])

    def zarr_group(self):
        import zarr
        from zarr.storage import FsspecStore

        store = FsspecStore(self.afs, path=self.root, read_only=True)
        return zarr.open_group(store=store, path="arrays", mode="r", zarr_format=3)

    def get(self, rel: str) -> bytes:
        return self.fs.cat_file(f"{self.root}/{rel}")

    def list(self) -> int:
        return len(self.fs.find(self.root))


def best(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times) * 1000


def measure(client_cls, shard: Path, latency: float) -> dict:
    files = sorted(str(p.relative_to(shard)) for p in shard.rglob("*") if p.is_file())
    client = client_cls(f"{client_cls.__name__}-{int(latency * 1000)}")
    out = {"upload": best(lambda: client.upload(shard, files), 2)}
    group = client.zarr_group()
    out["block"] = best(lambda: [client.zarr_group()[n][...] for n in group.array_keys()])
    offsets = group["offsets"][...]
    row = len(offsets) // 2
    a, b = int(offsets[row]), int(offsets[row + 1])
    names = [n for n in group.array_keys() if n not in ("offsets", "question_offsets", "question_features")]
    arrays = {n: group[n] for n in names}
    out["random"] = best(lambda: [arrays[n][a:b] for n in names])
    out["get"] = best(lambda: client.get("index.json"))
    out["list"] = best(client.list)
    out["bytes"] = sum((shard / f).stat().st_size for f in files)
    return out


def main() -> None:
    from tests.s3_server import s3_server

    work = Path(tempfile.mkdtemp(prefix="store-client-"))
    shard = make_shard(work / "cache")
    rows = []
    for latency in LATENCIES:
        with s3_server(latency) as server:
            os.environ.update(server.env())
            server.create_bucket(BUCKET)
            for client in (Obstore, Fsspec):
                r = measure(client, shard, latency)
                rows.append(f"| {client.name} | {latency * 1000:.0f} | {r['upload']:.0f} | {r['block']:.0f} | "
                            f"{r['random']:.1f} | {r['get']:.1f} | {r['list']:.1f} |")
    print(f"shard: {r['bytes'] / 2**20:.1f} MiB in {len(list(shard.rglob('*.json')))} json + zarr/parquet files\n")
    print("| client | added latency ms | upload shard ms | block read (all arrays) ms | random sample ms | "
          "GET index.json ms | LIST shard ms |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    asyncio.set_event_loop(None)


if __name__ == "__main__":
    main()
