"""A student batch pickles as one buffer per dtype and comes back equal, tensor for tensor."""

import pickle
from multiprocessing.reduction import ForkingPickler

import torch
import torch.multiprocessing  # noqa: F401  (registers the shared-memory tensor reductions, as DataLoader workers use)

from student.batches import CacheStudentData, StudentBatch
from student.packing import pack


def _tensors(x, out):
    if isinstance(x, torch.Tensor):
        out.append(x)
    elif isinstance(x, dict):
        for v in x.values():
            _tensors(v, out)
    elif isinstance(x, (list, tuple)):
        for v in x:
            _tensors(v, out)
    elif hasattr(x, "__dataclass_fields__"):
        for name in x.__dataclass_fields__:
            _tensors(getattr(x, name), out)
    return out


def test_batch_roundtrip_is_exact_and_packed(pair_cache, pair_student):
    data = CacheStudentData(pair_cache, pair_student.processor, pair_student.end_of_turn, pair_student.pad_id)
    batch = data.collate([data[i] for i in range(len(data))])
    original = _tensors((batch.inputs, batch.items), [])
    assert len(original) > 20 and any(t.dtype == torch.int64 for t in original)
    _, buffers = pack((batch.inputs, batch.items))
    assert len(buffers) == len({t.dtype for t in original})  # one tensor per dtype crosses the process boundary
    back = pickle.loads(ForkingPickler.dumps(batch))
    assert isinstance(back, StudentBatch) and back.prompt_lens == batch.prompt_lens
    restored = _tensors((back.inputs, back.items), [])
    assert len(restored) == len(original)
    for a, b in zip(original, restored):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert [i.sample_id for i in back.items] == [i.sample_id for i in batch.items]
