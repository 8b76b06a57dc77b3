"""Writer and reader: bit-exact round trips, resume bookkeeping, clear errors, DataLoader use."""

import numpy as np
import pytest
import torch

from schemas import CacheMismatchError
from pipeline.store.encoding import EncodingBoundError
from pipeline.store.reader import CacheReader
from tests.synthetic import SyntheticTeacher, synthetic_manifest
from pipeline.store.writer import CacheWriter
from tests.conftest import write_cache


def assert_same_sample(cached, sample, logprob_dtype=np.float16):
    assert np.array_equal(cached.target_ids, sample.target_ids.numpy())
    assert cached.features.dtype == np.uint16
    assert np.array_equal(cached.features.view(np.int16), sample.features.view(torch.int16).numpy())
    assert torch.equal(cached.features_torch(), sample.features)
    assert np.array_equal(cached.logsumexp, sample.logsumexp.numpy())
    assert np.array_equal(cached.topk_ids, sample.topk_ids.numpy())
    assert np.array_equal(cached.topk_logprobs, sample.topk_logprobs.numpy().astype(logprob_dtype))
    assert np.array_equal(cached.tail_logmass, sample.tail_logmass.numpy())
    if sample.question_features is None:
        assert cached.question_features is None
    else:
        assert np.array_equal(cached.question_features.view(np.int16), sample.question_features.view(torch.int16).numpy())


def test_round_trip_is_bit_exact(small_cache):
    root, samples = small_cache
    reader = CacheReader(root)
    assert len(reader) == len(samples) and len(reader.shards) > 3
    for sample in samples:
        assert_same_sample(reader.get(sample.sample_id), sample)


def test_float32_logprobs_round_trip_exactly(tmp_path, teacher):
    manifest = synthetic_manifest(k=8)
    manifest = type(manifest)(**{**manifest.__dict__, "topk": type(manifest.topk)(k=8, logprob_dtype="float32")})
    samples = write_cache(tmp_path / "c", teacher, ["a", "b", "c"], manifest=manifest)
    reader = CacheReader(tmp_path / "c")
    for sample in samples:
        assert_same_sample(reader.get(sample.sample_id), sample, logprob_dtype=np.float32)


@pytest.mark.parametrize("encoding", ["fp8_e4m3", "int8"])
def test_lossy_cache_states_and_keeps_its_bound(tmp_path, teacher, encoding):
    samples = write_cache(tmp_path / "c", teacher, [f"x{i}" for i in range(10)], encoding=encoding)
    reader = CacheReader(tmp_path / "c")
    assert not reader.manifest.features.lossless and reader.manifest.features.min_cosine == 0.999
    for sample in samples:
        cached = reader.get(sample.sample_id)
        for got, want in ((cached.features_float32(), sample.features), (cached.question_features_float32(), sample.question_features)):
            if want is None:
                continue
            want = want.float().numpy()
            cosine = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
            assert cosine.min() >= reader.manifest.features.min_cosine


def test_iteration_matches_random_access_in_shard_order(small_cache):
    root, samples = small_cache
    reader = CacheReader(root)
    seen = [s.sample_id for s in reader]
    assert seen == reader.sample_ids and sorted(seen) == sorted(s.sample_id for s in samples)
    for i, cached in enumerate(reader):
        assert np.array_equal(cached.features, reader[i].features)


def test_sample_table_and_meta(small_cache):
    root, samples = small_cache
    reader = CacheReader(root)
    table = reader.sample_table()
    assert table.num_rows == len(samples)
    meta = reader.sample_meta("s004")
    assert meta["answer"] == "answer s004" and meta["images"] == ["path:img/s004.png"]
    assert meta["messages"][0]["role"] == "user" and meta["num_tokens"] == len(reader.get("s004").target_ids)


def test_rejects_are_committed_and_count_as_done(tmp_path, teacher):
    manifest = synthetic_manifest()
    with CacheWriter(tmp_path, manifest, "w0") as writer:
        writer.add(teacher.sample("ok", 5, manifest.topk.k))
        writer.reject("broken", stage="image", reason="cannot decode PNG", source="data.json#3")
    reader = CacheReader(tmp_path)
    assert reader.rejects_table().to_pylist() == [
        {"sample_id": "broken", "source": "data.json#3", "stage": "image", "reason": "cannot decode PNG"}
    ]
    with CacheWriter(tmp_path, manifest, "w0") as again:
        assert again.done_ids == {"ok", "broken"}


def test_resume_knows_committed_ids_and_continues_numbering(tmp_path, teacher):
    manifest = synthetic_manifest()
    first = write_cache(tmp_path, teacher, [f"a{i}" for i in range(12)], manifest=manifest)
    with CacheWriter(tmp_path, manifest, "w0") as writer:
        assert writer.done_ids == {s.sample_id for s in first}
        with pytest.raises(ValueError, match="already in the cache"):
            writer.add(first[0])
        writer.add(teacher.sample("new", 4, manifest.topk.k))
    reader = CacheReader(tmp_path)
    assert len(reader) == 13 and not reader.duplicates
    seqs = [int(n.split("-")[1]) for n in reader.shards]
    assert len(set(seqs)) == len(seqs)


def test_bad_sample_shapes_name_the_sample(tmp_path, teacher):
    manifest = synthetic_manifest()
    sample = teacher.sample("wide", 4, manifest.topk.k)
    sample.features = torch.zeros(4, 65, dtype=torch.bfloat16)
    with CacheWriter(tmp_path, manifest, "w0") as writer:
        with pytest.raises(ValueError, match=r"sample 'wide': features has shape \(4, 65\), expected \(4, 64\)"):
            writer.add(sample)
        bad_ids = teacher.sample("ids", 4, manifest.topk.k)
        bad_ids.target_ids = torch.tensor([1, 2, 3, 999])
        with pytest.raises(ValueError, match="sample 'ids': target ids outside"):
            writer.add(bad_ids)


def test_writer_with_other_settings_is_refused_and_cache_untouched(small_cache):
    root, samples = small_cache
    before = sorted(p.name for p in (root / "shards").iterdir())
    with pytest.raises(CacheMismatchError, match="topk.k"):
        CacheWriter(root, synthetic_manifest(k=4), "w1")
    assert sorted(p.name for p in (root / "shards").iterdir()) == before
    assert len(CacheReader(root)) == len(samples)


def test_same_writer_id_twice_is_refused(tmp_path):
    manifest = synthetic_manifest()
    with CacheWriter(tmp_path, manifest, "w0"):
        with pytest.raises(RuntimeError, match="already running"):
            CacheWriter(tmp_path, manifest, "w0")
    CacheWriter(tmp_path, manifest, "w0").close()  # lock released on close


def test_exception_in_caller_still_commits_buffered_samples(tmp_path, teacher):
    manifest = synthetic_manifest(shard_target_tokens=10_000)
    with pytest.raises(KeyboardInterrupt):
        with CacheWriter(tmp_path, manifest, "w0") as writer:
            writer.add(teacher.sample("kept", 5, manifest.topk.k))
            raise KeyboardInterrupt
    assert CacheReader(tmp_path).sample_ids == ["kept"]


class _Samples(torch.utils.data.Dataset):
    def __init__(self, reader):
        self.reader = reader

    def __len__(self):
        return len(self.reader)

    def __getitem__(self, i):
        s = self.reader[i]
        return s.sample_id, torch.from_numpy(s.features_float32()).sum()


def test_reader_works_inside_dataloader_workers(small_cache):
    root, _ = small_cache
    reader = CacheReader(root)
    reader[0]  # open handles in the parent: they must not leak into workers
    loader = torch.utils.data.DataLoader(_Samples(reader), batch_size=None, num_workers=2)
    from_workers = {sid: float(total) for sid, total in loader}
    direct = {sid: float(total) for sid, total in (_Samples(reader)[i] for i in range(len(reader)))}
    assert from_workers == direct


def test_background_and_foreground_commits_write_the_same_arrays(tmp_path):
    ids = [f"b{i}" for i in range(25)]
    for mode in ("fg", "bg"):
        teacher = SyntheticTeacher(64, 500, seed=3)
        manifest = synthetic_manifest()
        with CacheWriter(tmp_path / mode, manifest, "w0", background=mode == "bg") as writer:
            for sample in teacher.samples(ids, manifest.topk.k, question_every=2):
                writer.add(sample)
    fg, bg = CacheReader(tmp_path / "fg"), CacheReader(tmp_path / "bg")
    assert fg.sample_ids == bg.sample_ids
    for sid in ids:
        a, b = fg.get(sid), bg.get(sid)
        assert np.array_equal(a.features, b.features) and np.array_equal(a.topk_logprobs, b.topk_logprobs)


def test_int8_refuses_features_whose_outliers_break_its_bound(tmp_path):
    # d=8192 LLM-like features: a few 30x channels set the absmax scale and squash the rest
    manifest = synthetic_manifest(hidden_size=8192, vocab_size=64, k=4, encoding="int8")
    teacher = SyntheticTeacher(8192, 64, seed=0)
    with CacheWriter(tmp_path, manifest, "w0") as writer:
        with pytest.raises(EncodingBoundError, match=r"sample 'outliers': int8 features reach cosine 0\.9\d+ < the stated 0\.999"):
            writer.add(teacher.sample("outliers", 8, manifest.topk.k))
    fp8 = synthetic_manifest(hidden_size=8192, vocab_size=64, k=4, encoding="fp8_e4m3")
    with CacheWriter(tmp_path / "fp8", fp8, "w0") as writer:
        writer.add(teacher.sample("outliers", 8, fp8.topk.k))  # fp8 keeps the bound on the same features
    assert CacheReader(tmp_path / "fp8").sample_ids == ["outliers"]
