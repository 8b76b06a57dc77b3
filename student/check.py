"""`student check --student S --cache C [--method M] [--stage N]`: will this pair train? Answered on CPU in
seconds, before a GPU-day is spent.

Loads both sides (the student, the cache's manifest and teacher head), builds one batch from the cache,
and runs one forward and backward of each stage of the method, and of the SFT stage 3 that may follow it. What a
stage needs (one tokenizer, the cache's layers or top-k, the teacher head), what trains beside the student and the
loss come from the stage's declaration (student/methods.py), as in training:

| method | stages | what a stage-1/2 check adds |
|---|---|---|
| genrecal | 1: Recalibrator only, 2: + student, 3: student SFT | the Recalibrator's block type |
| vlsi | 1: verbalizers, 2: + student (layer KL), 3: SFT | same tokenizer, the cache's layers, both sides' verbalizer layers |
| kd, uld | 2 (from --student), 3 | kd: same tokenizer; both: the cache's top-k |

Reports family, decoder class, hidden sizes, vocabularies and their padding, what each stage trains and
freezes, a memory estimate per stage, and every problem found. `check_pair` returns the report;
`report.ok` is False when the pair cannot train.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from student.methods import DEFAULT_METHOD, Method, Stage, StepParts, method_named

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


@dataclass
class _Pair:
    """What every stage check reads: the student, the cache's side and the one batch."""

    vlm: object
    parts: object  # pipeline/vlm/parts.py VLMParts of the student
    reader: object
    method: Method
    head: object | None  # the teacher head (when a checked stage declares teacher_head)
    batch: object | None
    seq: int
    memory_batch: int
    configs: dict  # stage -> the TrainConfig to check it with (`student check --config`); others: the defaults

    def config(self, number: int):
        """The settings stage `number` is checked with: the given ones, or the defaults `student train` would use."""
        from student.config import TrainConfig

        return self.configs.get(number) or TrainConfig(cache=str(self.reader.root), student=str(self.vlm.path),
                                                       out="check", stage=number, method=self.method.name)

    def loss(self, number: int):
        """The loss settings of stage `number` (also the SFT stage 3 that follows a method without one)."""
        from student.config import LossConfig

        return self.configs[number].loss if number in self.configs else LossConfig()


def check_pair(student: str, cache: str, stages=None, batch_size: int = 4, memory_batch: int = 8,
               method: str = DEFAULT_METHOD, configs: dict | None = None) -> CheckReport:
    """Everything above, for `stages` (default: all of `method`'s) of `student` against `cache`; problems are
    collected, not raised. `configs`: stage -> TrainConfig whose settings (loss, Recalibrator, verbalizers) that
    stage is checked with (a recipe's); a stage without one gets the defaults."""
    from pipeline.store.reader import CacheReader
    from pipeline.vlm.models import load_vlm
    from pipeline.vlm.parts import describe, vlm_parts

    report = CheckReport()
    try:
        declared = method_named(method).checked_stages()
    except ValueError as err:
        report.problems.append(str(err))
        return report
    stages = tuple(stages or declared)
    wrong = [s for s in stages if s not in declared]
    if wrong:
        report.problems.append(f"--method {method} has no stage {wrong[0]}: its stages are "
                               f"{', '.join(map(str, declared))}")
        return report
    chosen = {s: declared[s] for s in stages}
    try:  # what the method needs in any of its stages is checked whichever stages are tried
        reader = CacheReader(cache, read_layers=any(st.layers for st in declared.values()))
        if any(st.shared_tokenizer for st in declared.values()) and not _same_tokenizer(student, reader, cache, method,
                                                                                       report):
            return report  # training refuses such a pair before the student loads; so does the check
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
    layers = any(st.layers for st in chosen.values())
    if layers and not _cache_layers(reader, report):
        return report
    if any(st.topk for st in declared.values()) and reader.manifest.topk.k == 0:
        report.problems.append(f"--method {method} needs the cache's top-k log-probs; this cache was dumped with "
                               "--top-k 0 (dump it again with --top-k 16, say)")
    batch = _one_batch(reader, vlm, batch_size, report, layers=layers)
    head = _head(reader, cache, report) if any(st.teacher_head for st in chosen.values()) else None
    seq = int(batch.inputs["input_ids"].shape[1]) if batch is not None else 0
    pair = _Pair(vlm, parts, reader, method_named(method), head, batch, seq, memory_batch, configs or {})
    for number, stage in chosen.items():
        _check_stage(pair, number, stage, report)
    return report


def _same_tokenizer(student: str, reader, cache: str, method: str, report: CheckReport) -> bool:
    from student.tokenizer_match import check_same_tokenizer, load_tokenizer

    try:
        check_same_tokenizer(load_tokenizer(student), reader.manifest, cache, student, method)
    except ValueError as err:
        report.problems.append(str(err))
        return False
    report.lines.append(f"tokenizer: the student's is the teacher's ({reader.manifest.teacher.tokenizer_vocab_size} "
                        f"tokens), as --method {method} needs")
    return True


def _cache_layers(reader, report: CheckReport) -> bool:
    try:
        layers = reader.require_layers()
    except ValueError as err:
        report.problems.append(str(err))
        return False
    report.lines.append(f"cache layers: {', '.join(map(str, layers))} of the teacher's "
                        f"{reader.manifest.teacher.num_hidden_layers}")
    return True


def _head(reader, cache: str, report: CheckReport):
    from pipeline.store.teacher_head import TeacherHead, load_teacher_head

    try:
        weight, bias = load_teacher_head(cache, reader.manifest)
    except (OSError, ValueError) as err:
        report.problems.append(f"teacher head: {err}")
        return None
    teacher = reader.manifest.teacher
    return TeacherHead(weight.float(), None if bias is None else bias.float(), teacher.logit_scale,
                       teacher.final_logit_softcapping)


def _one_batch(reader, vlm, batch_size: int, report: CheckReport, layers: bool = False):
    from student.batches import CacheStudentData

    data = CacheStudentData(reader, vlm.processor, vlm.end_of_turn, vlm.pad_id, layers=layers)
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


def _check_stage(pair: _Pair, number: int, stage: Stage, report: CheckReport) -> None:
    """The stage's parameter counts and memory estimate, then one forward and backward of its loss."""
    from student.trainable import stage_split, trainable_student_parameters

    model = pair.vlm.model
    train, frozen = stage_split(model, number)
    numel = dict((n, p.numel()) for n, p in model.named_parameters())
    beside = _beside(pair, number, stage, report)
    if beside is False:
        return
    trained = sum(numel[n] for n in train) + (sum(p.numel() for p in beside.params) if beside else 0)
    frozen_count = sum(numel[n] for n in frozen)
    head_bytes = pair.head.weight.numel() * 4 if (pair.head is not None and stage.teacher_head) else 0
    layers = (len(pair.parts.layers) if number in (2, 3) else 0) + (beside.blocks if beside else 0)
    activations = pair.memory_batch * pair.seq * layers * pair.parts.hidden_size * _ACTIVATION_WIDTHS * 4
    memory = trained * _TRAINED_BYTES + frozen_count * _FROZEN_BYTES + head_bytes + activations
    added = f" + {stage.beside}" if beside else ""
    report.lines.append(f"stage {number}: trains {trained:,} parameters ({len(train)} student tensors{added}), "
                        f"freezes {frozen_count:,}; estimated memory at batch {pair.memory_batch} x {pair.seq} "
                        f"tokens: {memory / 2**20:.0f} MiB (fp32)")
    if pair.batch is None or (stage.teacher_head and pair.head is None):
        return
    trainable_student_parameters(model, number)
    model.train()
    try:
        loss = _stage_loss(pair, number, stage, beside)
        loss.backward()
        if not torch.isfinite(loss):
            report.problems.append(f"stage {number}: the loss is {float(loss)}")
    except Exception as err:  # noqa: BLE001 - any failure here is what the user needs to see
        report.problems.append(f"stage {number}: forward/backward failed: {type(err).__name__}: {err}")
    finally:
        model.zero_grad(set_to_none=True)
        model.eval()


def _beside(pair: _Pair, number: int, stage: Stage, report: CheckReport):
    """What the stage trains beside the student, new, as `student train` builds it (the Recalibrator, both sides'
    verbalizers at their default layers; a `Beside`), None, or False when it cannot be built (reported)."""
    if stage.build is None:
        return None
    try:
        beside = stage.build(pair.config(number), None, pair.vlm, pair.reader.manifest, "cpu")
    except ValueError as err:  # e.g. a student with no intermediate layer, or no block to copy
        report.problems.append(f"stage {number}: cannot build the {stage.beside}: {err}")
        return False
    report.lines.append(f"stage {number} {stage.beside}: {beside.summary}")
    return beside


def _stage_loss(pair: _Pair, number: int, stage: Stage, beside) -> torch.Tensor:
    """The stage's declared loss on the batch, as a training step computes it (the stage's loss settings)."""
    parts = StepParts(pair.vlm.model, beside.module if beside else None, pair.head, pair.loss(number), number,
                      vocab=len(pair.vlm.tokenizer))
    return stage.loss(parts, pair.batch, False)["total"]
