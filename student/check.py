"""`student check --student S --cache C [--stage N]`: will this pair train? Answered on CPU in seconds,
before a GPU-day is spent.

Loads both sides (the student, the cache's manifest and teacher head), builds one batch from the cache,
and runs one forward and backward of each stage (1: Recalibrator only, 2: + student, 3: student SFT).
Reports family, decoder class, Recalibrator block type, hidden sizes, vocabularies and their padding,
what each stage trains and freezes, a memory estimate per stage, and every problem found.
`check_pair` returns the report; `report.ok` is False when the pair cannot train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# bytes per trained fp32 parameter: weight 4 + gradient 4 + AdamW moments 8
_TRAINED_BYTES, _FROZEN_BYTES = 16, 4
# activations kept for the backward pass, per token and layer, in units of the hidden width (fp32): attention
# inputs/outputs, the MLP's widened activations, norms; a rough figure for transformer blocks
_ACTIVATION_WIDTHS = 34


@dataclass
class CheckReport:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def text(self) -> str:
        out = list(self.lines)
        out += [f"problem: {p}" for p in self.problems] or ["the pair can train"]
        return "\n".join(out)


def check_pair(student: str, cache: str, stages=(1, 2, 3), batch_size: int = 4, memory_batch: int = 8) -> CheckReport:
    """Everything above, for `stages` of `student` against `cache`; problems are collected, not raised."""
    from pipeline.store.reader import CacheReader
    from pipeline.store.teacher_head import TeacherHead, load_teacher_head
    from pipeline.vlm.models import load_vlm
    from pipeline.vlm.parts import describe, vlm_parts

    report = CheckReport()
    try:
        reader = CacheReader(cache)
        vlm = load_vlm(student, dtype="float32", device="cpu")
        parts = vlm_parts(vlm.model)
    except (OSError, ValueError) as err:  # UnsupportedFamily and ModelLoadError are ValueErrors
        report.problems.append(str(err))
        return report
    teacher = reader.manifest.teacher
    report.lines.append(f"student: {describe(parts)}; projector {len(parts.projector_parameter_names)} tensors, "
                        f"vision encoder {len(parts.vision_parameter_names)} tensors")
    report.lines.append(f"teacher: {teacher.family} ({teacher.architecture}), hidden {teacher.hidden_size}, vocabulary "
                        f"{teacher.tokenizer_vocab_size} tokens in {teacher.vocab_size} head rows (padding "
                        f"{teacher.vocab_size - teacher.tokenizer_vocab_size}); student hidden {parts.hidden_size}")
    rows, size = parts.head.weight.shape[0], len(vlm.tokenizer)
    report.lines.append(f"student vocabulary: tokenizer {size}, head rows {rows} (padding {rows - size})")
    if size > rows:
        report.problems.append(f"the student's tokenizer has {size} tokens but its head only {rows} rows: resize the "
                               "embeddings (model.resize_token_embeddings) or use the matching tokenizer")
    batch = _one_batch(reader, vlm, batch_size, report)
    head = None
    if any(s in (1, 2) for s in stages):
        try:
            weight, bias = load_teacher_head(cache, reader.manifest)
            head = TeacherHead(weight.float(), None if bias is None else bias.float(), teacher.logit_scale,
                               teacher.final_logit_softcapping)
        except (OSError, ValueError) as err:
            report.problems.append(f"teacher head: {err}")
    seq = int(batch.inputs["input_ids"].shape[1]) if batch is not None else 0
    for stage in stages:
        _check_stage(vlm, parts, head, batch, stage, teacher.hidden_size, seq, memory_batch, report)
    return report


def _one_batch(reader, vlm, batch_size: int, report: CheckReport):
    from student.batches import CacheStudentData

    data = CacheStudentData(reader, vlm.processor, vlm.end_of_turn, vlm.pad_id)
    items, reasons = [], []
    for i in range(min(len(data), 4 * batch_size)):
        try:
            items.append(data[i])
        except ValueError as err:  # TemplateError and image errors: the sample cannot be encoded for the student
            reasons.append(f"{data.sample_ids[i]}: {err}")
        if len(items) == batch_size:
            break
    if reasons:
        report.lines.append(f"{len(reasons)} of {len(items) + len(reasons)} samples tried cannot be encoded for the "
                            f"student, first: {reasons[0]}")
    if not items:
        report.problems.append("no cache sample can be encoded for the student" + (f" ({reasons[0]})" if reasons else ""))
        return None
    return data.collate(items)


def _check_stage(vlm, parts, head, batch, stage: int, d_teacher: int, seq: int, memory_batch: int, report) -> None:
    from student.config import LossConfig
    from student.recalibrator import Recalibrator
    from student.step import genrecal_losses, student_ce, student_forward
    from student.trainable import stage_split, trainable_student_parameters

    train, frozen = stage_split(vlm.model, stage)
    numel = dict((n, p.numel()) for n, p in vlm.model.named_parameters())
    rec = None
    if stage in (1, 2):
        try:
            rec = Recalibrator.from_student(vlm.model, d_teacher)
            report.lines.append(f"stage {stage} Recalibrator: {rec.block_kind}")
        except ValueError as err:
            report.problems.append(f"stage {stage}: cannot build the Recalibrator: {err}")
            return
    rec_params = sum(p.numel() for p in rec.parameters()) if rec is not None else 0
    trained = sum(numel[n] for n in train) + rec_params
    frozen_count = sum(numel[n] for n in frozen)
    head_bytes = head.weight.numel() * 4 if (head is not None and stage != 3) else 0
    layers = (len(parts.layers) if stage in (2, 3) else 0) + (len(rec.layers) if rec is not None else 0)
    activations = memory_batch * seq * layers * parts.hidden_size * _ACTIVATION_WIDTHS * 4
    memory = trained * _TRAINED_BYTES + frozen_count * _FROZEN_BYTES + head_bytes + activations
    report.lines.append(f"stage {stage}: trains {trained:,} parameters ({len(train)} student tensors"
                        f"{' + Recalibrator' if rec is not None else ''}), freezes {frozen_count:,}; estimated "
                        f"memory at batch {memory_batch} x {seq} tokens: {memory / 2**20:.0f} MiB (fp32)")
    if batch is None or (stage != 3 and head is None):
        return
    trainable_student_parameters(vlm.model, stage)
    vlm.model.train()
    try:
        if stage == 3:
            _, logits = student_forward(vlm.model, batch, True)
            loss = student_ce(logits, batch)
        else:
            loss = genrecal_losses(vlm.model, rec, head, batch, stage, LossConfig())["total"]
        loss.backward()
        if not torch.isfinite(loss):
            report.problems.append(f"stage {stage}: the loss is {float(loss)}")
    except Exception as err:  # noqa: BLE001 - any failure here is what the user needs to see
        report.problems.append(f"stage {stage}: forward/backward failed: {type(err).__name__}: {err}")
    finally:
        vlm.model.zero_grad(set_to_none=True)
        vlm.model.eval()
