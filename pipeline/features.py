"""The teacher's forward pass: final hidden states, and the head only where features are stored.

For a 72B teacher with a 152k vocabulary, logits cost ~2.5 GFLOP per token; the
prompt (image tokens, question) is most of the sequence and needs no logits, so the
body runs alone and the head is applied only to the stored positions, in chunks.

Top-k, log-sum-exp and tail mass are computed from the features *as stored* (after
encoding and decoding), so the cache is self-consistent: the head applied to the
cached features reproduces the cached top-k exactly.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from schemas import FeatureEncoding
from pipeline.encoding import check_lossy_bound, decode_features, encode_features
from pipeline.models import scale_and_cap


@dataclass
class TeacherHead:
    """The teacher's output layer and the logit transforms its family applies."""

    weight: torch.Tensor  # [vocab, d]
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """float32 logits [T, vocab] for features [T, d] (matmul in the head's dtype, like the model's lm_head)."""
        x = torch.nn.functional.linear(features.to(self.weight.dtype), self.weight, self.bias).float()
        return scale_and_cap(x, self.logit_scale, self.softcap)


def head_statistics(head: TeacherHead, features: torch.Tensor, k: int, chunk_tokens: int = 256) -> dict[str, torch.Tensor]:
    """logsumexp [T], and for k > 0 topk_ids [T, k], topk_logprobs [T, k], tail_logmass [T].

    At most `chunk_tokens` x vocab logits exist at a time.
    """
    parts: dict[str, list[torch.Tensor]] = {"logsumexp": []}
    if k:
        parts.update(topk_ids=[], topk_logprobs=[], tail_logmass=[])
    for start in range(0, len(features), chunk_tokens):
        logits = head.logits(features[start : start + chunk_tokens].to(head.weight.device))
        lse = torch.logsumexp(logits, dim=-1)
        parts["logsumexp"].append(lse.cpu())
        if not k:
            continue
        logprobs = logits - lse[:, None]
        top = logprobs.topk(k, dim=-1)
        rest = logprobs.scatter(-1, top.indices, float("-inf"))
        parts["topk_ids"].append(top.indices.cpu())
        parts["topk_logprobs"].append(top.values.cpu())
        parts["tail_logmass"].append(torch.logsumexp(rest, dim=-1).cpu())
    return {name: torch.cat(chunks) if chunks else torch.zeros(0) for name, chunks in parts.items()}


def stored_positions(prompt_len: int, answer_len: int) -> slice:
    """Positions whose next token is an answer token: the last prompt position, then all answer positions but the last."""
    return slice(prompt_len - 1, prompt_len + answer_len - 1)


def roundtrip(features: torch.Tensor, encoding: FeatureEncoding, where: str) -> tuple[np.ndarray, np.ndarray | None, torch.Tensor]:
    """(stored payload, scales, float32 features exactly as a reader will decode them).

    A lossy encoding that misses the manifest's stated cosine bound raises (see check_lossy_bound).
    """
    payload, scales = encode_features(features, encoding.encoding)
    decoded = decode_features(payload, scales, encoding.encoding)
    check_lossy_bound(features, decoded, encoding.encoding, encoding.min_cosine, where)
    return payload, scales, torch.from_numpy(decoded)


def wants_question_features(sample_id: str, fraction: float) -> bool:
    """Deterministic choice from the id: every worker and every rerun picks the same samples."""
    if fraction <= 0:
        return False
    return zlib.crc32(sample_id.encode()) / 2**32 < fraction
