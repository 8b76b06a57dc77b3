"""What a cache needs on disk, from the cache format itself (schemas/shard.py's array specs), before any dump:

    bytes_per_row("bf16", hidden=8192, k=64)        # {"tokens": 16780, "question_tokens": 16384, "samples+1": 16}
    cache_bytes(1_000_000, "fp8_e4m3", hidden=8192, k=64, answer_positions=128,
                question_positions=1024, question_fraction=0.05)   # bytes of a million samples, uncompressed

A row of kind "tokens" is one stored answer position (the last prompt position and every answer position but the
last), "question_tokens" one prompt position of a sample that keeps its question features, "samples+1" one sample
(its offsets). Sizes are before compression: blosc-zstd takes about 1.3x off features and more off ids and
log-probs (schemas/DESIGN.md); `pipeline inspect` prints the real bytes per token of a cache. The recipes' storage
lines are computed here, and tests/test_recipes.py recomputes them.
"""

from __future__ import annotations

import numpy as np

from schemas import ARRAY_SPECS, LAYER_ARRAY_SPECS, FeatureEncoding


def bytes_per_row(encoding: str, hidden: int, k: int, logprob_dtype: str = "float16", layers: int = 0) -> dict:
    """Row kind -> bytes every array of a cache with these settings stores per row of that kind."""
    scales = FeatureEncoding(encoding, lossless=encoding == "bf16").has_scales
    dtypes = {"features": FeatureEncoding(encoding, lossless=encoding == "bf16").stored_dtype,
              "logprobs": logprob_dtype}
    out: dict[str, int] = {}
    specs = [(spec, 1) for spec in ARRAY_SPECS.values()] + [(spec, layers) for spec in LAYER_ARRAY_SPECS.values()]
    for spec, copies in specs:
        present = {"always": True, "scales": scales, "topk": k > 0, "layers": True, "layers+scales": scales}
        if not present[spec.present]:
            continue
        width = {"hidden": hidden, "k": k, None: 1}[spec.width]
        size = np.dtype(dtypes.get(spec.dtype, spec.dtype)).itemsize * width * copies
        out[spec.rows] = out.get(spec.rows, 0) + size
    return out


def cache_bytes(samples: int, encoding: str, hidden: int, k: int, answer_positions: float, question_positions: float,
                question_fraction: float, logprob_dtype: str = "float16", layers: int = 0) -> float:
    """Uncompressed bytes of `samples` samples with `answer_positions` stored positions each on average, of which
    `question_fraction` also keep `question_positions` prompt positions."""
    rows = bytes_per_row(encoding, hidden, k, logprob_dtype, layers)
    per_sample = (rows["tokens"] * answer_positions + rows["question_tokens"] * question_positions * question_fraction
                  + rows["samples+1"])
    return samples * per_sample
