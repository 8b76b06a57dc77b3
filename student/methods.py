"""Every training method, declared once: its stages and, per stage, what it reads from the cache, what is checked
before the student loads, what trains beside the student, the terms it logs and its loss of one batch.

    method_of(cfg)  -> Method  (the declaration of cfg.method)
    stage_of(cfg)   -> Stage   (the declaration of cfg.stage of that method)

What depends on the method asks these instead of comparing names: the config's validation (student/config.py),
the CLI's choices and help (student/cli_options.py, student/cli.py), the recipe (student/train.py: what to read,
check and build), the loop (student/loop.py: the terms and the loss), the checkpoint (the folders of what trains
beside the student) and `student check` (student/check.py).

| method | stages | teacher head | cache layers | cached top-k | one tokenizer | beside the student |
|---|---|---|---|---|---|---|
| genrecal | 1, 2, 3 | 1-2 | - | 1-2 with --teacher-distribution topk | - | the Recalibrator (1-2) |
| vlsi | 1, 2, 3 | 1-2 | 1-2 | 2 with --teacher-distribution topk | 1-2 | both sides' verbalizers (1-2) |
| kd | 2 | - | - | 2 | 2 | - |
| uld | 2 | - | - | 2 (untempered) | - | - |

Stage 1 trains only what is beside the student (the student is frozen), stage 2 the student (but its vision
encoder) too; stage 3 is the same for every method that has it, `SFT`: plain SFT of the student on the cache's
answers (or, with --data, a data source's). kd and uld are one stage-2 run from --student, which a stage 3 may
follow (`student check` tries it). Every method's first stage starts from --student, a later one from the previous
stage's folder.

To add a method: write its loss of one batch (and, when something trains beside the student, its set-up), declare
its stages and add it to METHODS. Nothing else changes; tests/test_methods.py adds one inside a test.

The loss code and torch are imported inside the functions that run them: student/config.py imports this module,
and the config (and `student --help`) stay as light as before.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only: config.py imports this module
    from student.config import LossConfig, TrainConfig

SFT_STAGE = 3


@dataclass(frozen=True)
class StepParts:
    """What the loss of one batch reads, fixed for a stage (student/loop.py and student/check.py build it)."""

    student: object  # the student model
    beside: object | None  # Beside.module: the Recalibrator, VLsI's verbalizers, or None
    head: object | None  # the frozen TeacherHead (stages with teacher_head)
    loss: LossConfig
    stage: int
    sharded: bool = False  # FSDP: the student's head runs only inside its own forward
    vocab: int | None = None  # the student tokenizer's size: kd leaves the head's padding rows out of its softmax


@dataclass
class Beside:
    """What a stage trains beside the student, built once the student is loaded (`Stage.build`)."""

    module: object  # handed to the stage's loss as StepParts.beside
    params: list  # the parameters the optimizer trains
    modules: dict  # name -> nn.Module, beside "student" in the ModuleDict the optimizer state refers to
    folders: dict  # checkpoint folder name -> function(folder) writing it, beside the HF student in OUT/stageN/
    summary: str  # what was built, one line (`student check`)
    blocks: int = 0  # decoder blocks it runs per token (`student check`'s activation estimate)


@dataclass(frozen=True)
class Stage:
    """One stage of a method: what it reads, checks, trains and computes."""

    terms: tuple[str, ...]  # the terms it logs, "total" last; each is logged every step (0 where a batch has none)
    loss: Callable  # (StepParts, StudentBatch, measure_reliance: bool) -> {term: tensor, ..., "total": tensor}
    teacher: bool = True  # reads the teacher's cached arrays (final features, answer ids, top-k, question features)
    teacher_head: bool = False  # loads the frozen teacher head (its file is checked before the student loads)
    layers: bool = False  # reads the cache's intermediate teacher layers
    topk: bool = False  # its loss reads the cached top-k log-probs, whatever --teacher-distribution says
    topk_if_asked: bool = False  # its KL reads them with --teacher-distribution topk (else the head on the features)
    tempered: bool = True  # a KL against the cached top-k runs at --temperature, which must then be the cache's
    shared_tokenizer: bool = False  # the student's tokenizer must be the teacher's (checked before the student loads)
    beside: str = ""  # what trains beside the student, in words ("" for nothing)
    prepare: Callable | None = None  # (cfg, reader, out, resumed, model) -> what `build` loads: cheap checks, no model
    build: Callable | None = None  # (cfg, prepared or None for new ones, vlm, manifest, device) -> Beside


@dataclass(frozen=True)
class Method:
    name: str  # `--method NAME`
    summary: str  # one line for `student train --help`
    stages: dict[int, Stage]  # the stages `student train --method NAME --stage N` runs
    options: tuple[str, ...] = ()  # TrainConfig fields only this method reads (other methods refuse them)
    check_options: Callable | None = None  # (cfg) -> None, or ValueError: this method's option values

    @property
    def first_stage(self) -> int:
        """The stage that starts from --student."""
        return min(self.stages)

    def checked_stages(self) -> dict[int, Stage]:
        """What `student check` tries: the method's stages and the SFT stage 3 that may follow any run."""
        return dict(sorted({SFT_STAGE: SFT, **self.stages}.items()))


# -- SFT: stage 3 of every method that has one ------------------------------------------------------------

def sft_loss(p: StepParts, batch, measure_reliance: bool = False) -> dict:
    """The student's own next-token CE on its answer tokens."""
    from student.step import student_ce, student_forward

    _, logits = student_forward(p.student, batch, True, p.sharded)
    loss = student_ce(logits, batch)
    return {"student_ce": loss, "total": loss}


SFT = Stage(terms=("student_ce", "total"), loss=sft_loss, teacher=False)


# -- genrecal: the Recalibrator and the frozen teacher head (docs/method.md, student/step.py) ---------------

def genrecal_loss(p: StepParts, batch, measure_reliance: bool = False) -> dict:
    from student.step import genrecal_losses

    return genrecal_losses(p.student, p.beside, p.head, batch, p.stage, p.loss, measure_reliance, p.sharded)


@dataclass(frozen=True)
class RecalibratorSource:
    """What `build_recalibrator` loads: the stage folder whose Recalibrator this stage continues (None: a new one)
    and, for a layout fed the teacher's token embeddings, the cache that holds them (checked already)."""

    folder: Path | None
    token_cache: Path | None = None


def recalibrator_source(cfg: TrainConfig, reader, out: Path, resumed: bool, model: str) -> RecalibratorSource:
    """Its own folder on --resume, stage 1's in a stage 2 (but with --from-student), else none; a layout that needs
    the teacher's token embeddings checks the cache has them now, before the student loads."""
    from student.checkpoint import stage_dir
    from student.layouts import layout_named

    if resumed:
        folder = out
    else:
        folder = stage_dir(cfg, 1) if cfg.stage == 2 and not cfg.from_student else None
    token_cache = None
    if layout_named(cfg.loss.layout).token_embeddings:
        from pipeline.store.teacher_embeddings import check_teacher_embeddings

        check_teacher_embeddings(reader.root, reader.manifest)
        token_cache = Path(reader.root)
    return RecalibratorSource(folder, token_cache)


def build_recalibrator(cfg: TrainConfig, source: RecalibratorSource | None, vlm, manifest, device) -> Beside:
    from student.checkpoint import RECALIBRATOR_DIR, load_recalibrator, save_recalibrator
    from student.layouts import layout_named
    from student.recalibrator import Recalibrator

    source = source or RecalibratorSource(None)
    rec = Recalibrator.from_student(vlm.model, manifest.teacher.hidden_size, depth=cfg.rec_depth, init=cfg.rec_init,
                                    seed=cfg.seed)
    if layout_named(cfg.loss.layout).token_embeddings:
        from pipeline.store.teacher_embeddings import load_teacher_embeddings

        if source.token_cache is None:
            raise ValueError(f"--layout {cfg.loss.layout} needs the cache's token embeddings (recalibrator_source)")
        rec.attach_token_embeddings(load_teacher_embeddings(source.token_cache, manifest), seed=cfg.seed)
    if source.folder is not None:
        load_recalibrator(rec, Path(source.folder) / RECALIBRATOR_DIR)
    rec = rec.to(device)
    return Beside(rec, list(rec.parameters()), {"rec": rec}, {RECALIBRATOR_DIR: partial(save_recalibrator, rec)},
                  rec.block_kind, blocks=len(rec.layers))


def _genrecal_stage(terms: tuple[str, ...]) -> Stage:
    return Stage(terms=terms, loss=genrecal_loss, teacher_head=True, topk_if_asked=True, beside="Recalibrator",
                 prepare=recalibrator_source, build=build_recalibrator)


GENRECAL = Method(
    "genrecal",
    "the Recalibrator and the frozen teacher head (stages 1-3), any tokenizer pair",
    {1: _genrecal_stage(("ce", "kl", "reg_ce", "reg_kl", "total")),  # the Recalibrator alone
     2: _genrecal_stage(("ce", "kl", "reg_ce", "reg_kl", "student_ce", "total")),  # + the student and its own CE
     3: SFT})


# -- uld and kd: the student's CE plus a distance to the cached top-k, from --student (student/step.py) -----

def uld_loss(p: StepParts, batch, measure_reliance: bool = False) -> dict:
    from student.step import uld_losses

    return uld_losses(p.student, batch, p.loss, p.sharded)


def kd_loss(p: StepParts, batch, measure_reliance: bool = False) -> dict:
    from student.step import kd_losses

    return kd_losses(p.student, batch, p.loss, p.sharded, p.vocab)


ULD = Method(
    "uld",
    "the cross-tokenizer baseline Universal Logit Distillation, stage 2 only, from --student with no Recalibrator "
    "(the student's CE plus the sorted-probability L1 to the cached top-k, weight --uld-weight)",
    # ULD compares sorted probabilities: no temperature on either side
    {2: Stage(terms=("student_ce", "uld", "total"), loss=uld_loss, topk=True, tempered=False)})

KD = Method(
    "kd",
    "plain logit distillation for a student with the teacher's tokenizer, stage 2 only, from --student (the "
    "student's CE plus KL to the cached top-k + tail, weight --kd-weight)",
    {2: Stage(terms=("student_ce", "kd", "paired_share", "total"), loss=kd_loss, topk=True, shared_tokenizer=True)})


# -- vlsi: verbalized layer-wise distillation (student/vlsi.py, vlsi_step.py, vlsi_train.py) ----------------

def vlsi_loss(p: StepParts, batch, measure_reliance: bool = False) -> dict:
    from student.vlsi_step import vlsi_losses

    return vlsi_losses(p.student, p.beside, p.head, batch, p.stage, p.loss)


def verbalizer_sources(cfg: TrainConfig, reader, out: Path, resumed: bool, model: str):
    """The cache's layers and the folders each side's verbalizers load from (student/vlsi_train.py)."""
    from student.vlsi_train import check_vlsi_inputs

    return check_vlsi_inputs(cfg, reader, out, resumed, model)


def build_verbalizers(cfg: TrainConfig, sources, vlm, manifest, device) -> Beside:
    from student.vlsi_train import VerbalizerSources, set_up_verbalizers, trainable_verbalizers, verbalizer_modules

    parts = set_up_verbalizers(cfg, sources or VerbalizerSources(None, None, tuple(manifest.layers)), vlm, manifest,
                               device)
    modules = verbalizer_modules(parts)
    summary = (f"teacher layers {', '.join(map(str, parts.teacher.layers))}, student layers "
               f"{', '.join(map(str, parts.student.layers))} (--student-layers picks others)")
    return Beside(parts, trainable_verbalizers(parts), modules, {name: m.save for name, m in modules.items()}, summary)


def check_vlsi_options(cfg: TrainConfig) -> None:
    if cfg.fsdp:
        raise ValueError("--method vlsi does not support --fsdp yet (its verbalizers read the student's head "
                         "weights directly); use data parallel (torchrun without --fsdp)")
    if cfg.match_window < 1:
        raise ValueError(f"--match-window must be at least 1, not {cfg.match_window}")
    if cfg.student_layers is not None:
        from student.vlsi import parse_layers

        parse_layers(cfg.student_layers)


def _vlsi_stage(terms: tuple[str, ...], **reads) -> Stage:
    return Stage(terms=terms, loss=vlsi_loss, teacher_head=True, layers=True, shared_tokenizer=True,
                 beside="verbalizers", prepare=verbalizer_sources, build=build_verbalizers, **reads)


VLSI = Method(
    "vlsi",
    "verbalized layer-wise distillation (VLsI) for a student with the teacher's tokenizer and a cache with "
    "intermediate layers (stage 1: verbalizers; 2: layer matching; 3: SFT)",
    {1: _vlsi_stage(("teacher_verbalizer_ce", "student_verbalizer_ce", "total")),  # the student frozen
     # stage 2 also logs match_s{l}, the teacher layer each student layer matched, a metric outside `terms`
     2: _vlsi_stage(("layer_kl", "last_kl", "student_ce", "paired_share", "total"), topk_if_asked=True),
     3: SFT},
    options=("student_layers", "teacher_verbalizers"),
    check_options=check_vlsi_options)


METHODS: dict[str, Method] = {m.name: m for m in (GENRECAL, ULD, KD, VLSI)}
DEFAULT_METHOD = GENRECAL.name


# -- what the rest of the student asks ----------------------------------------------------------------------

def method_named(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown --method {name!r}: one of {', '.join(METHODS)}")
    return METHODS[name]


def method_of(cfg: TrainConfig) -> Method:
    return method_named(cfg.method)


def stage_of(cfg: TrainConfig) -> Stage:
    return method_of(cfg).stages[cfg.stage]


def check_config(cfg: TrainConfig) -> None:
    """The method's rules for a TrainConfig (its __post_init__ calls this): a stage it has, a cache where it has no
    SFT stage, no other method's options, its own options' values."""
    method = method_of(cfg)
    if cfg.stage not in method.stages or (cfg.cache is None and SFT_STAGE not in method.stages):
        raise ValueError(f"--method {method.name} is a stage-{'/'.join(map(str, method.stages))} run against a teacher "
                         f"cache: use --stage {method.first_stage} --cache CACHE (it starts from --student; a stage 3 "
                         "may follow it)")
    for other in METHODS.values():
        if other is not method and any(getattr(cfg, name) is not None for name in other.options):
            flags = " and ".join("--" + name.replace("_", "-") for name in other.options)
            raise ValueError(f"{flags} are --method {other.name} options")
    if method.check_options is not None:
        method.check_options(cfg)


def run_label(cfg: TrainConfig) -> str:
    """The progress bar's name of a run: "stage 2", or "stage 2 (kd)" for a method other than the default."""
    return f"stage {cfg.stage}" + (f" ({cfg.method})" if cfg.method != DEFAULT_METHOD else "")


def methods_help() -> str:
    """Each method's one line, for `student train --help`."""
    return "; ".join(f"{m.name}: {m.summary}" for m in METHODS.values()) + "."


def stages_help() -> str:
    """The stages `student check` tries per method, for its --help."""
    return "; ".join(f"{m.name}: {', '.join(map(str, m.checked_stages()))}" for m in METHODS.values())
