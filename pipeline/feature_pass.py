"""The feature phase of a dump: length-sorted batches through the teacher body, head only at stored positions.

For a 72B teacher with a 152k vocabulary, logits cost ~2.5 GFLOP per token; the
prompt (image tokens, question) is most of the sequence and needs no logits, so the
body runs alone and the head is applied only to the stored positions, in chunks.

With `--layers`, the hidden states of those decoder layers come from the same forward (hooks on the chosen
blocks, so only they are kept) and are stored at the same positions, in the same encoding, checked the same way.

Top-k, log-sum-exp and tail mass are computed from the features *as stored* (after
encoding and decoding), so the cache is self-consistent: the head applied to the
cached features reproduces the cached top-k exactly.
"""

from __future__ import annotations

import time
import zlib

import numpy as np
import torch

from schemas import FeatureEncoding
from pipeline.vlm.data import DataSample
from pipeline.store.encoding import check_lossy_bound, decode_features, encode_features
from pipeline.store.teacher_head import TeacherHead
from pipeline.vlm.parts import body_forward, body_forward_with_layers
from pipeline.vlm.prompting import EncodedSample, collate
from pipeline.store.writer import TeacherSample

Item = tuple[EncodedSample, DataSample]


def pack_batches(items: list[Item], max_batch_tokens: int) -> list[list[Item]]:
    """Sort by length and cut into batches whose padded size (count x longest) fits the budget.

    A sample longer than the budget still runs, alone.
    """
    ordered = sorted(items, key=lambda item: item[0].total_len)
    batches, current = [], []
    for item in ordered:
        if current and (len(current) + 1) * item[0].total_len > max_batch_tokens:
            batches.append(current)
            current = []
        current.append(item)
    if current:
        batches.append(current)
    return batches


class FeaturePass:
    """Runs batches through the teacher and returns finished TeacherSamples for the writer."""

    def __init__(self, teacher, manifest):
        self.teacher = teacher
        self.encoding = manifest.features
        self.k = manifest.topk.k
        self.question_fraction = manifest.positions.question_features_fraction
        self.layers = tuple(manifest.layers)  # intermediate layers, from the same forward (body_forward_with_layers)
        self.device = teacher.model.device

    @torch.inference_mode()
    def run(self, batch: list[Item], stats) -> list[TeacherSample]:
        encoded = [e for e, _ in batch]
        inputs = {k: v.to(self.device) for k, v in collate(encoded, self.teacher.pad_id).items()}
        t0 = time.perf_counter()
        if self.layers:
            hidden, mid = body_forward_with_layers(self.teacher.model, self.layers, **inputs)
        else:
            hidden, mid = body_forward(self.teacher.model, **inputs), {}
        _synchronize(self.device)
        t1 = time.perf_counter()
        positions = [stored_positions(e.prompt_len, len(e.answer_ids)) for e in encoded]
        payloads = [roundtrip(hidden[b, p], self.encoding, f"sample {e.sample_id!r}")
                    for b, (p, e) in enumerate(zip(positions, encoded))]
        # intermediate layers: the same positions of the same forward, encoded and checked like the features
        layer_payloads = [
            {l: roundtrip(mid[l][b, p], self.encoding, f"sample {e.sample_id!r} (layer {l})")[:2] for l in self.layers}
            for b, (p, e) in enumerate(zip(positions, encoded))
        ]
        questions = [
            roundtrip(hidden[b, : e.prompt_len], self.encoding, f"sample {e.sample_id!r} (question features)")
            if wants_question_features(e.sample_id, self.question_fraction)
            else None
            for b, e in enumerate(encoded)
        ]
        t2 = time.perf_counter()
        heads = head_statistics(self.teacher.head, torch.cat([p[2] for p in payloads]), self.k)
        _synchronize(self.device)
        stats.forward_seconds += (t1 - t0) + (time.perf_counter() - t2)
        stats.tokens += sum(e.total_len for e in encoded)
        out, start = [], 0
        for (e, sample), (payload, scales, _), question, layered in zip(batch, payloads, questions, layer_payloads):
            n = len(e.answer_ids)
            rows = {name: value[start : start + n] for name, value in heads.items()}
            start += n
            stats.stored_tokens += n
            out.append(
                TeacherSample(
                    sample_id=e.sample_id,
                    target_ids=torch.tensor(e.answer_ids),
                    features=payload,
                    feature_scales=scales,
                    question_features=question[0] if question else None,
                    question_feature_scales=question[1] if question else None,
                    layer_features={l: p for l, (p, _) in layered.items()} if self.layers else None,
                    layer_feature_scales=({l: sc for l, (_, sc) in layered.items()}
                                          if self.layers and self.encoding.has_scales else None),
                    source=sample.source,
                    images=[spec.ref for spec in sample.images],
                    messages=sample.messages,
                    answer=sample.answer,
                    **rows,
                )
            )
        return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
