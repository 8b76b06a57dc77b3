"""Feature encodings against torch's own conversions, and the stated lossy error bounds."""

import numpy as np
import pytest
import torch

from schemas import MIN_COSINE
from pipeline.store.encoding import FP8_E4M3_TABLE, decode_features, encode_features, float32_to_bf16_bits


def test_bf16_tensor_bits_are_kept_exactly():
    x = torch.randn(33, 17).to(torch.bfloat16)
    payload, scales = encode_features(x, "bf16")
    assert scales is None and payload.dtype == np.uint16
    assert np.array_equal(payload.view(np.int16), x.view(torch.int16).numpy())
    assert torch.equal(torch.from_numpy(decode_features(payload, None, "bf16")), x.float())


def test_float32_to_bf16_rounds_like_torch():
    x = np.concatenate([np.random.default_rng(0).standard_normal(100_000) * 1e3, [0.0, -0.0, 1e-40, 3e38]])
    x = x.astype(np.float32)
    ours = float32_to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(ours, theirs)


def test_fp8_table_matches_torch_for_every_byte():
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(np.isnan(every), np.isnan(FP8_E4M3_TABLE))
    finite = ~np.isnan(every)
    assert np.array_equal(every[finite], FP8_E4M3_TABLE[finite])


@pytest.mark.parametrize("encoding", ["fp8_e4m3", "int8"])
def test_lossy_encodings_stay_within_stated_cosine(teacher, encoding):
    x = teacher.features(2000, torch.Generator().manual_seed(1)).float().numpy()
    payload, scales = encode_features(x, encoding)
    y = decode_features(payload, scales, encoding)
    cosine = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
    assert cosine.min() >= MIN_COSINE[encoding], cosine.min()
    assert y.dtype == np.float32 and y.shape == x.shape


def test_lossy_encoding_of_zero_rows_is_safe():
    payload, scales = encode_features(np.zeros((3, 8), np.float32), "int8")
    assert np.array_equal(decode_features(payload, scales, "int8"), np.zeros((3, 8)))
