"""The feature phase of a dump: length-sorted batches through the teacher body, head at stored positions."""

from __future__ import annotations

import time

import torch

from pipeline.data import DataSample
from pipeline.features import head_statistics, roundtrip, stored_positions, wants_question_features
from pipeline.models import body_forward
from pipeline.prompting import EncodedSample, collate
from pipeline.writer import TeacherSample

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

    def __init__(self, cfg, teacher, manifest):
        self.teacher = teacher
        self.encoding = manifest.features
        self.k = manifest.topk.k
        self.question_fraction = manifest.positions.question_features_fraction
        self.device = teacher.model.device

    @torch.inference_mode()
    def run(self, batch: list[Item], stats) -> list[TeacherSample]:
        encoded = [e for e, _ in batch]
        inputs = {k: v.to(self.device) for k, v in collate(encoded, self.teacher.pad_id).items()}
        t0 = time.perf_counter()
        hidden = body_forward(self.teacher.model, **inputs)
        _synchronize(self.device)
        t1 = time.perf_counter()
        picked = [hidden[b, stored_positions(e.prompt_len, len(e.answer_ids))] for b, e in enumerate(encoded)]
        payloads = [roundtrip(h, self.encoding, f"sample {e.sample_id!r}") for h, e in zip(picked, encoded)]
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
        for (e, sample), (payload, scales, _), question in zip(batch, payloads, questions):
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
