"""Block reads: whole shards in memory give the same samples as random reads; the shard-window batch order
covers every sample once per epoch, resumes exactly, slices by rank and does not depend on the workers."""

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.dump import dump_teacher
from pipeline.dump_config import DumpConfig
from pipeline.store.reader import CacheReader
from student.batches import CacheStudentData, LengthGroupedSampler, ShardWindowSampler, batch_order, make_loader
from tests.test_store import assert_same_sample

ARRAY_FIELDS = ("target_ids", "features", "feature_scales", "logsumexp", "topk_ids", "topk_logprobs", "tail_logmass",
                "question_features", "question_feature_scales")


def assert_identical(a, b):
    assert (a.sample_id, a.shard, a.row, a.encoding) == (b.sample_id, b.shard, b.row, b.encoding)
    for name in ARRAY_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), (a.sample_id, name)
        if x is not None:
            assert x.dtype == y.dtype and np.array_equal(x, y), (a.sample_id, name)


# -- reader --------------------------------------------------------------------------------------------------------
def test_block_reads_equal_random_reads_bit_exact(small_cache):
    root, samples = small_cache
    random_reader, block_reader = CacheReader(root), CacheReader(root, max_block_shards=2)
    order = [s.sample_id for s in samples]
    random.Random(0).shuffle(order)  # shard hops: blocks get evicted and read again
    written = {s.sample_id: s for s in samples}
    for sid in order:
        block = block_reader.get_from_block(sid)
        assert_same_sample(block, written[sid])  # against what was written, not only against the other path
        assert_identical(block, random_reader.get(sid))
    assert len(block_reader._blocks) <= 2


def test_shard_order_reads_each_shard_once_and_hands_out_copies(small_cache):
    root, _ = small_cache
    reader = CacheReader(root, max_block_shards=1)
    for sid in reader.sample_ids:  # shard order
        sample = reader.get_from_block(sid)
        assert not np.shares_memory(sample.features, reader.shard_block(sample.shard).tokens["features"])
    assert reader.shard_reads == len(reader.shards) > 3


def test_unknown_sample_names_the_cache(small_cache):
    root, _ = small_cache
    with pytest.raises(KeyError, match="sample 'nope' is not in the cache at"):
        CacheReader(root).get_from_block("nope")


# -- batch order ---------------------------------------------------------------------------------------------------
def synthetic_layout(shards=10, per_shard=23):
    names = [f"shard{i}" for i in range(shards) for _ in range(per_shard)]
    lengths = random.Random(1).sample(range(10_000), len(names))  # distinct lengths: sorted runs are unambiguous
    return names, lengths


def lru_shard_reads(batches, shards, capacity):
    """Whole-shard reads a worker with an LRU of `capacity` shards does for `batches` (plain simulation)."""
    held, reads = [], 0
    for batch in batches:
        for i in batch:
            name = shards[i]
            if name in held:
                held.remove(name)
            else:
                reads += 1
            held.append(name)
            del held[:-capacity]
    return reads


def test_every_epoch_is_a_permutation_read_shard_by_shard():
    shards, lengths = synthetic_layout()
    sampler = ShardWindowSampler(shards, lengths, batch_size=8, seed=3, window=3)
    for epoch in range(3):
        sampler.epoch = epoch
        batches = sampler.batches()
        assert sorted(i for b in batches for i in b) == list(range(len(shards)))
        assert all(1 <= len(b) <= 8 for b in batches)
        assert lru_shard_reads(batches, shards, capacity=3) == 10  # each shard read once per epoch
    # the global shuffle (random reads) hops between shards: the LRU would read far more
    assert lru_shard_reads(LengthGroupedSampler(lengths, 8, seed=3).batches(), shards, capacity=3) > 100


def test_batches_are_length_grouped_within_a_window():
    shards, lengths = synthetic_layout()
    assert all(len({shards[i] for i in b}) <= 2 for b in ShardWindowSampler(shards, lengths, 8, window=2).batches())
    # one shard per window, and group * batch_size covers it: its batches are consecutive runs of its sorted lengths
    by_shard = {}
    for b in ShardWindowSampler(shards, lengths, batch_size=8, seed=0, window=1, group=50).batches():
        (name,) = {shards[i] for i in b}
        by_shard.setdefault(name, []).append((min(lengths[i] for i in b), max(lengths[i] for i in b)))
    for spans in by_shard.values():
        spans.sort()
        assert all(hi < next_lo for (_, hi), (next_lo, _) in zip(spans, spans[1:])), "batches overlap in length"


def test_the_seed_fixes_the_order():
    shards, lengths = synthetic_layout()
    a = ShardWindowSampler(shards, lengths, 8, seed=5).batches()
    assert a == ShardWindowSampler(shards, lengths, 8, seed=5).batches()
    assert a != ShardWindowSampler(shards, lengths, 8, seed=6).batches()
    later = ShardWindowSampler(shards, lengths, 8, seed=5)
    later.epoch = 1
    assert a != later.batches()


# -- loader on a real multi-shard cache -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded_cache(tmp_path_factory, tiny_vlm_dir):
    out = tmp_path_factory.mktemp("sharded-cache")
    dump_teacher(DumpConfig(model=str(tiny_vlm_dir("qwen2-vl-tiny", "qwen2")), data="easy-vqa:train", out=str(out),
                            limit=20, top_k=4, question_features_fraction=0.5, shard_target_tokens=10), progress=False)
    return out


@pytest.fixture
def data(sharded_cache, pair_student):
    tok = pair_student.tokenizer
    from pipeline.vlm.models import end_of_turn_ids

    eot = end_of_turn_ids(tok, pair_student.processor.chat_template)
    return CacheStudentData(sharded_cache, pair_student.processor, eot, tok.pad_token_id)


def loader_cfg(**kw):
    base = dict(steps=6, grad_accum=1, batch_size=3, seed=0, num_workers=0, cache_reads="block", shuffle_shards=2)
    return SimpleNamespace(**{**base, **kw})


def drain(loader, n):
    return [next(loader) for _ in range(n)]


def ids_of(batches):
    return [[item.sample_id for item in b.items] for b in batches]


def test_the_cache_has_several_shards_and_blocks_match_random_reads(data):
    assert len(set(data.shards)) >= 4
    for i in range(len(data)):
        data.block_reads = True
        block = data[i]
        data.block_reads = False
        single = data[i]
        assert torch.equal(block.teacher_features, single.teacher_features)
        assert torch.equal(block.teacher_targets, single.teacher_targets)
        assert torch.equal(block.teacher_topk.logprobs, single.teacher_topk.logprobs)
        assert (block.teacher_question is None) == (single.teacher_question is None)
        if block.teacher_question is not None:
            assert torch.equal(block.teacher_question, single.teacher_question)


def test_resume_from_micro_batch_k_is_the_tail_of_the_whole_run(data):
    cfg = loader_cfg(steps=14)  # more than one epoch (20 samples, batch 3)
    whole = ids_of(drain(make_loader(data, cfg, first=0), 14))
    assert whole == [[data.sample_ids[i] for i in b] for b in batch_order(data, cfg)[:14]]
    for k in (1, 5, 9):
        assert ids_of(drain(make_loader(data, cfg, first=k), 14 - k)) == whole[k:]


def test_two_workers_give_the_same_batches_as_none(data):
    cfg = loader_cfg(steps=8)
    inline = drain(make_loader(data, cfg, first=0), 8)
    workers = drain(make_loader(data, loader_cfg(steps=8, num_workers=2), first=0), 8)
    assert ids_of(inline) == ids_of(workers)
    for a, b in zip(inline, workers):
        assert all(torch.equal(x.teacher_features, y.teacher_features) for x, y in zip(a.items, b.items))
        assert torch.equal(a.inputs["input_ids"], b.inputs["input_ids"])


def test_ranks_partition_the_global_order(data):
    world, first = 2, 3
    cfg = loader_cfg(steps=5)
    tail = [[data.sample_ids[i] for i in b] for b in batch_order(data, cfg, world)[first:]]
    per_rank = [ids_of(list(make_loader(data, cfg, first=first, rank=r, world=world))) for r in range(world)]
    assert per_rank[0] + per_rank[1] != tail  # interleaved, not halves
    merged = [b for pair in zip(*per_rank) for b in pair] + per_rank[0][len(per_rank[1]):]
    assert merged == tail and sum(map(len, per_rank)) == len(tail)


def test_random_reads_keep_the_global_shuffle(data):
    cfg = loader_cfg(cache_reads="random")
    assert batch_order(data, cfg)[:4] == LengthGroupedSampler(data.lengths, 3, seed=0).batches()[:4]
    make_loader(data, cfg, first=0)
    assert data.block_reads is False
    with pytest.raises(ValueError, match="cache_reads must be one of"):
        make_loader(data, loader_cfg(cache_reads="zarr"), first=0)
