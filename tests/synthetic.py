"""Synthetic but self-consistent teacher outputs, for tests and benchmarks.

Features look like LLM final hidden states in the ways that matter for storage:
per-channel scales spread over two orders of magnitude and a few outlier channels.
Top-k, log-sum-exp and tail mass are computed from a real head applied to the
features, exactly as the teacher pass computes them, so caches built here obey
every invariant `pipeline verify` and the trainer rely on.
"""

from __future__ import annotations

import zlib

import torch

from schemas import (
    MIN_COSINE,
    CacheManifest,
    DataInfo,
    FeatureEncoding,
    PositionsInfo,
    ResponsesInfo,
    StorageInfo,
    TeacherInfo,
    TopKInfo,
)
from pipeline.store.writer import TeacherSample


def synthetic_manifest(
    hidden_size: int = 64,
    vocab_size: int = 500,
    k: int = 8,
    encoding: str = "bf16",
    shard_target_tokens: int = 64,
    chunk_tokens: int = 16,
    codecs: dict | None = None,
    question_features_fraction: float = 0.0,
    layers: tuple[int, ...] = (),
    num_hidden_layers: int | None = None,
) -> CacheManifest:
    """A manifest for `SyntheticTeacher` caches; `layers` (e.g. (1, 2)) adds intermediate-layer arrays, and the
    teacher then has `num_hidden_layers` layers (default: one more than the deepest stored layer)."""
    storage = StorageInfo(shard_target_tokens=shard_target_tokens, chunk_tokens=chunk_tokens)
    if codecs:
        storage = StorageInfo(shard_target_tokens, chunk_tokens, {**storage.codecs, **codecs})
    return CacheManifest(
        teacher=TeacherInfo(
            model="synthetic",
            family="synthetic",
            architecture="SyntheticTeacher",
            hidden_size=hidden_size,
            vocab_size=vocab_size,
            tokenizer_vocab_size=vocab_size,
            dtype="bfloat16",
            tokenizer_fingerprint="0" * 64,
            end_of_turn_token_ids=(vocab_size - 1,),
            num_hidden_layers=num_hidden_layers or (max(layers) + 1 if layers else None),
        ),
        responses=ResponsesInfo(source="dataset"),
        data=DataInfo(source="synthetic"),
        features=FeatureEncoding(encoding, lossless=encoding == "bf16", min_cosine=MIN_COSINE[encoding]),
        topk=TopKInfo(k=k),
        positions=PositionsInfo(question_features_fraction=question_features_fraction),
        storage=storage,
        layers=tuple(layers),
    )


class SyntheticTeacher:
    """A random head plus a feature generator with LLM-like channel statistics."""

    def __init__(self, hidden_size: int, vocab_size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.seed = seed
        scales = torch.exp(torch.randn(hidden_size, generator=g) * 0.8)
        outliers = torch.randperm(hidden_size, generator=g)[: max(1, hidden_size // 256)]
        scales[outliers] *= 30.0
        self.channel_scales = scales
        self.head = (torch.randn(vocab_size, hidden_size, generator=g) / hidden_size**0.5).to(torch.bfloat16)

    def features(self, n: int, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(n, self.channel_scales.numel(), generator=generator)
        return (noise * self.channel_scales).to(torch.bfloat16)

    def _generator(self, sample_id: str) -> torch.Generator:
        """Each sample's data depends only on (seed, id): a resumed run regenerates identical samples."""
        return torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(sample_id.encode()))

    def sample(self, sample_id: str, n: int, k: int, question_tokens: int = 0, layers: tuple[int, ...] = ()) -> TeacherSample:
        """One sample; `layers` adds intermediate-layer features (each a noisier, smaller copy of the final ones,
        as hidden states of earlier layers are related to the last but not equal)."""
        g = self._generator(sample_id)
        feats = self.features(n, g)
        logits = feats.float() @ self.head.float().T
        logprobs = torch.log_softmax(logits, dim=-1)
        lse = torch.logsumexp(logits, dim=-1)
        targets = torch.multinomial(logprobs.exp(), 1, generator=g).squeeze(1)
        extra = {}
        if k:
            top = logprobs.topk(k, dim=-1)
            rest = logprobs.scatter(-1, top.indices, float("-inf"))
            extra = dict(topk_ids=top.indices, topk_logprobs=top.values, tail_logmass=torch.logsumexp(rest, -1))
        return TeacherSample(
            sample_id=sample_id,
            target_ids=targets,
            features=feats,
            logsumexp=lse,
            question_features=self.features(question_tokens, g) if question_tokens else None,
            source=f"synthetic#{sample_id}",
            messages=[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"q {sample_id}"}]}],
            answer=f"answer {sample_id}",
            images=[f"path:img/{sample_id}.png"],
            layer_features={l: self.layer_features(feats, l, g) for l in layers} if layers else None,
            **extra,
        )

    def layer_features(self, final: torch.Tensor, layer: int, generator: torch.Generator) -> torch.Tensor:
        """Features of an intermediate layer: the final ones shrunk by 1 / (1 + layer) plus fresh noise."""
        return (final.float() / (1 + layer) + self.features(len(final), generator).float() * 0.5).to(torch.bfloat16)

    def samples(self, ids: list[str], k: int, min_tokens: int = 3, max_tokens: int = 20, question_every: int = 0,
                layers: tuple[int, ...] = ()):
        """Yield samples with lengths in [min_tokens, max_tokens]; about 1 in `question_every` has question features.

        Lengths and the question-feature choice depend only on (seed, id), like the data itself.
        """
        for sid in ids:
            h = zlib.crc32(f"{self.seed}/{sid}".encode())
            n = min_tokens + h % (max_tokens - min_tokens + 1)
            q = 5 + (h >> 8) % 35 if question_every and (h >> 16) % question_every == 0 else 0
            yield self.sample(sid, n, k, question_tokens=q, layers=layers)
