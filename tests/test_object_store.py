"""The cache on an S3-compatible server (moto on 127.0.0.1): the reads zarr needs, the commit protocol
(schemas/COMMIT.md), crashes, concurrent writers, corruption and the errors a user sees."""

import json
import os
import signal
import socket
import sys
import urllib.request
from datetime import timedelta

import obstore

import numpy as np
import pytest
import torch

from pipeline.store.backend import StorageError, open_storage
from pipeline.store.inspect_cache import cache_summary
from pipeline.store.reader import CacheReader
from pipeline.store.teacher_head import load_teacher_head, write_teacher_head
from pipeline.store.verify import verify_cache
from pipeline.store.writer import CacheWriter
from tests.conftest import write_cache
from tests.s3_fixtures import s3, s3_session, s3_url  # noqa: F401  (fixtures)
from tests.synthetic import SyntheticTeacher, synthetic_manifest
from tests.test_crash_and_concurrency import assert_same_contents, reference_cache, run_writer

IDS = [f"s{i:03d}" for i in range(40)]


def test_the_server_honours_range_suffix_and_offset_reads(s3_url):
    """zarr reads a shard's index with a suffix range and its chunks with byte ranges: a server (or a client)
    that ignored either would return whole objects or wrong bytes, so both paths are pinned here."""
    from zarr.abc.store import OffsetByteRequest, RangeByteRequest, SuffixByteRequest
    from zarr.core.buffer import default_buffer_prototype

    storage = open_storage(s3_url)
    data = bytes(range(256)) * 4
    storage.write_atomic("blob", data)
    assert storage.read_range("blob", 100, 150) == data[100:150]
    signed = obstore.sign(storage.store, "GET", "blob", timedelta(minutes=5))  # a presigned URL: plain HTTP below
    assert signed.startswith(os.environ["AWS_ENDPOINT_URL"])
    for header, expected in (("bytes=10-19", data[10:20]), ("bytes=-7", data[-7:]), ("bytes=1020-", data[1020:])):
        request = urllib.request.Request(signed, headers={"Range": header})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request) as reply:
            assert reply.status == 206 and reply.read() == expected, header  # the server itself, no client between
    from zarr.core.sync import sync
    from zarr.storage import ObjectStore

    zstore, proto = ObjectStore(storage.store, read_only=True), default_buffer_prototype()
    for byte_range, expected in ((RangeByteRequest(3, 9), data[3:9]), (SuffixByteRequest(16), data[-16:]),
                                 (OffsetByteRequest(1000), data[1000:]), (None, data)):
        got = sync(zstore.get("blob", proto, byte_range))
        assert got.to_bytes() == expected, byte_range


def test_a_cache_in_a_bucket_reads_verifies_and_inspects_like_a_folder(s3_url, teacher, tmp_path):
    write_cache(s3_url, teacher, IDS)
    local = tmp_path / "local"
    write_cache(local, teacher, IDS)
    remote = CacheReader(s3_url)
    assert remote.root == s3_url and len(remote.shards) > 1
    assert_same_contents(remote, CacheReader(local))
    for sid in IDS[::7]:  # block reads (whole shards) agree with random reads
        a, b = remote.get(sid), remote.get_from_block(sid)
        assert np.array_equal(a.features, b.features) and np.array_equal(a.topk_ids, b.topk_ids)
    assert remote.sample_table().num_rows == len(IDS)
    report = verify_cache(s3_url)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    summary, reference = cache_summary(s3_url), cache_summary(local)
    assert summary["cache"] == s3_url
    for key in ("samples", "shards", "tokens", "question_tokens", "head_bytes"):
        assert summary[key] == reference[key], key
    weight, _ = load_teacher_head(s3_url, remote.manifest)  # downloaded once, checked against its sha256
    assert torch.equal(weight, teacher.head)
    assert not any(p.name.startswith("s3") for p in tmp_path.iterdir()) and not os.path.exists("s3:")


class _Sums(torch.utils.data.Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, i):
        s = self.reader.get_from_block(self.reader.sample_ids[i])
        return s.sample_id, float(s.features_float32().sum())


def test_the_reader_works_in_dataloader_workers(s3_url, teacher):
    write_cache(s3_url, teacher, IDS[:12])
    reader = CacheReader(s3_url)
    reader.get(IDS[0])  # a client and zarr handles in the parent must not leak into the workers
    assert reader.worker_start_method == "forkserver"  # obstore's client does not survive a fork
    loader = torch.utils.data.DataLoader(_Sums(reader), batch_size=None, num_workers=2,
                                         multiprocessing_context=reader.worker_start_method)
    assert dict(loader) == {sid: total for sid, total in (_Sums(reader)[i] for i in range(len(reader)))}


def test_block_reads_fetch_whole_shards_once_into_the_bounded_local_cache(s3, s3_url, teacher, tmp_path):
    from pipeline.store.local_cache import set_local_cache_dir, set_local_cache_limit

    write_cache(s3_url, teacher, IDS)
    kept = tmp_path / "local"
    set_local_cache_dir(kept)  # what --cache-dir-local does; a Storage takes it when opened
    try:
        reader = CacheReader(s3_url)
        sid = reader.indexes[reader.shards[1]].sample_ids[0]
        first = reader.get_from_block(sid)
        fresh = CacheReader(s3_url)
        before = s3.requests
        again = fresh.get_from_block(sid)
        assert s3.requests == before  # the whole shard came from the local copy: not one request
        assert np.array_equal(first.features, again.features) and np.array_equal(first.topk_ids, again.topk_ids)
        set_local_cache_limit(1)  # a bound smaller than one shard keeps only the shard just used
        small = CacheReader(s3_url)
        for name in small.shards[:3]:
            small.shard_block(name)
        assert [p.name for p in (kept / "shards").glob("*/*")] == [small.shards[2]]
    finally:
        set_local_cache_dir(None)
        set_local_cache_limit(None)


def test_a_second_writer_with_the_same_id_is_refused_and_a_dead_ones_lock_taken_over(s3_url):
    manifest = synthetic_manifest()
    with CacheWriter(s3_url, manifest, "w0"):
        with pytest.raises(RuntimeError, match="already running"):
            CacheWriter(s3_url, manifest, "w0")
        CacheWriter(s3_url, manifest, "w1").close()  # another id is no conflict
    storage = open_storage(s3_url)
    assert not storage.exists("locks/w0.lock")  # released on close
    dead = {"host": socket.gethostname(), "pid": 2**22 + 12345, "renewed_at": 0, "lease_s": 60}  # no such pid
    storage.write_atomic("locks/w0.lock", json.dumps(dead).encode())
    CacheWriter(s3_url, manifest, "w0").close()  # a killed writer's lock: taken over at once on its host
    elsewhere = {"host": "another-host", "pid": 1, "renewed_at": 10**10, "lease_s": 60}  # renewed "now"
    storage.write_atomic("locks/w0.lock", json.dumps(elsewhere).encode())
    with pytest.raises(RuntimeError, match="already running"):
        CacheWriter(s3_url, manifest, "w0")


def test_sigkill_mid_upload_then_rerun_stores_every_sample_once(s3_url, tmp_path):
    proc = run_writer(s3_url, "w0", 0, 60, "--hang-in-commit", "3")
    line = proc.stdout.readline()
    assert line.startswith("IN_COMMIT"), line
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    storage = open_storage(s3_url)
    (leftover,) = storage.uncommitted_shards()  # half of its objects uploaded, no commit object...
    assert storage.list_files(f"shards/{leftover}")
    partial = CacheReader(s3_url)
    assert 0 < len(partial) < 60 and leftover not in partial.shards  # ...so no reader sees it
    assert any("leftover" in w for w in verify_cache(s3_url).warnings)

    rerun = run_writer(s3_url, "w0", 0, 60)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0 and "DONE" in out
    assert not storage.uncommitted_shards()  # the rerun removed what it left
    write_teacher_head(s3_url, SyntheticTeacher(64, 500, seed=0).head)
    resumed = CacheReader(s3_url)
    assert len(resumed) == 60 and not resumed.duplicates
    report = verify_cache(s3_url)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    assert_same_contents(resumed, reference_cache(tmp_path / "ref", 0, 60))


def test_two_writer_processes_into_one_prefix_give_the_union(s3_url, tmp_path):
    procs = [run_writer(s3_url, "w0", 0, 40), run_writer(s3_url, "w1", 40, 80)]
    for proc in procs:
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "DONE 40" in out
    write_teacher_head(s3_url, SyntheticTeacher(64, 500, seed=0).head)
    reader = CacheReader(s3_url)
    assert len(reader) == 80 and not reader.duplicates
    assert {reader.indexes[n].writer_id for n in reader.shards} == {"w0", "w1"}
    report = verify_cache(s3_url)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    assert_same_contents(reader, reference_cache(tmp_path / "ref", 0, 80))


def test_verify_names_a_corrupted_object(s3_url, teacher):
    write_cache(s3_url, teacher, IDS)
    storage = open_storage(s3_url)
    shard = storage.committed_shards()[1]
    files = storage.list_files(f"shards/{shard}")
    (target,) = [f for f in files if f.startswith("arrays/features/c")]
    data = bytearray(storage.read_bytes(f"shards/{shard}/{target}"))
    data[len(data) // 3] ^= 0xFF
    storage.write_atomic(f"shards/{shard}/{target}", bytes(data))
    index = json.loads(storage.read_bytes(f"shards/{shard}/index.json"))
    other = storage.committed_shards()[0]
    index_bytes = storage.read_bytes(f"shards/{other}/index.json")
    storage.write_atomic(f"shards/{other}/index.json", index_bytes.replace(b'"created_at"', b'"created_at" '))
    report = verify_cache(s3_url)
    assert not report.ok and set(report.problems) == {shard, other}
    assert any(f"file {target}: sha256 differs" in p for p in report.problems[shard])
    assert any("commit object" in p for p in report.problems[other])
    assert index["name"] == shard


def test_a_missing_bucket_and_refused_credentials_are_clear_errors(s3, s3_url):
    from moto.core.authorization import enable_iam_authentication

    with pytest.raises(StorageError, match="bucket does not exist") as err:
        open_storage("s3://genrecal-no-such-bucket/cache").check_access(write=False)
    assert "s3://genrecal-no-such-bucket/cache" in str(err.value)
    with enable_iam_authentication():  # moto now checks signatures against its IAM users: ours is unknown
        with pytest.raises(StorageError, match="access refused: check the credentials") as err:
            open_storage(s3_url).check_access(write=True)
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in str(err.value)


def test_a_folder_cache_copied_into_a_bucket_is_committed_there(s3_url, small_cache):
    from pipeline.store.copy_cache import copy_cache

    root, samples = small_cache
    names = copy_cache(root, s3_url)
    assert open_storage(s3_url).committed_shards() == names == CacheReader(root).shards
    report = verify_cache(s3_url)
    assert report.ok and not report.warnings, (report.problems, report.warnings)
    assert_same_contents(CacheReader(s3_url), CacheReader(root))


def test_the_response_log_appends_objects_and_reads_every_writers(s3_url):
    from pipeline.response_log import ResponseLog

    first = ResponseLog(s3_url, "w0")
    first.append([{"sample_id": "a", "response": "yes"}])
    first.append([{"sample_id": "b", "error": "too long", "stage": "length"}])
    ResponseLog(s3_url, "w1").append([{"sample_id": "c", "response": "no"}])
    again = ResponseLog(s3_url, "w0")  # a rerun (or another worker split) finds every answer
    assert {k: again.get(k)["sample_id"] for k in "abc"} == {"a": "a", "b": "b", "c": "c"}
    assert len(open_storage(s3_url).list_files("responses")) == 3  # no append on an object store: one object each


@pytest.mark.parametrize("url, extra", [("s3://b/c", "s3"), ("gs://b/c", "gcs"), ("az://b/c", "azure")])
def test_a_url_without_the_extra_installed_names_the_extra(monkeypatch, url, extra):
    monkeypatch.setitem(sys.modules, "obstore", None)  # import obstore now fails
    with pytest.raises(StorageError, match=rf"pip install 'genrecal\[{extra}\]'"):
        open_storage(url)


def test_an_unknown_scheme_is_refused():
    with pytest.raises(StorageError, match="unknown storage scheme ftp://"):
        open_storage("ftp://host/cache")
