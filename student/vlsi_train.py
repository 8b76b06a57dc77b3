"""The set-up of a VLsI stage (`student train --method vlsi`, student/vlsi.py): the cheap checks that come
before any model loads (cache layers, where the verbalizers come from) and the verbalizers themselves once the
student is loaded. student/methods.py declares them as VLsI's stages 1-2 (`prepare`, `build`); the shared-tokenizer
check, which kd needs too, is student/train.py's.

Where a stage's verbalizers come from:

| stage | teacher verbalizers | student verbalizers |
|---|---|---|
| 1 | new and trained; with --teacher-verbalizers DIR loaded from DIR and frozen | new |
| 2 | --teacher-verbalizers DIR, else OUT/stage1's (frozen) | OUT/stage1's (new with --from-student) |
| resume | the stage folder's own | the stage folder's own |

Every checkpoint of stages 1-2 writes both sets beside the stock HF student folder (OUT/stageN/
teacher_verbalizers, student_verbalizers), never into the cache.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.vlm.models import decoder_layer_count
from pipeline.vlm.parts import vlm_parts
from student.checkpoint import CONFIG_FILE, stage_dir
from student.vlsi import (
    META,
    STUDENT_VERBALIZERS_DIR,
    TEACHER_VERBALIZERS_DIR,
    Verbalizers,
    parse_layers,
    student_layers,
    teacher_source,
)
from student.vlsi_step import VLsIParts

if TYPE_CHECKING:  # annotations only: config.py imports student/methods.py, which imports this module
    from student.config import TrainConfig


@dataclass
class VerbalizerSources:
    """Folders to load each side's verbalizers from (None: new ones)."""

    teacher: Path | None
    student: Path | None
    teacher_layers: tuple[int, ...]


def check_vlsi_inputs(cfg: TrainConfig, reader, out: Path, resumed: bool, model: str) -> VerbalizerSources:
    """The cache's layers and the verbalizer folders a VLsI stage 1-2 needs; raises ValueError / FileNotFoundError
    before any model loads."""
    layers = reader.require_layers()  # a cache without intermediate layers fails here, saying how to dump them
    previous = stage_dir(cfg, 1) if cfg.stage == 2 and not cfg.from_student else None
    given = Path(cfg.teacher_verbalizers) if cfg.teacher_verbalizers else None
    if resumed:
        _check_resumed_like_started(cfg, out)
        teacher, student = out / TEACHER_VERBALIZERS_DIR, out / STUDENT_VERBALIZERS_DIR
    else:
        teacher = given or (previous / TEACHER_VERBALIZERS_DIR if previous else None)
        student = previous / STUDENT_VERBALIZERS_DIR if previous else None
        if cfg.stage == 2 and teacher is None:
            raise FileNotFoundError("--method vlsi --stage 2 --from-student needs trained teacher verbalizers: pass "
                                    "--teacher-verbalizers OUT/stage1/teacher_verbalizers of an earlier run on this "
                                    "cache, or run --stage 1 first")
    for folder in (teacher, student):
        if folder is not None and not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no verbalizers there (run `student train --method vlsi --stage 1`)")
    if cfg.student_layers:  # the student's depth from its config alone (a meta-device skeleton, no weights)
        student_layers(parse_layers(cfg.student_layers), decoder_layer_count(model), layers)
    return VerbalizerSources(teacher, student, layers)


def _check_resumed_like_started(cfg: TrainConfig, out: Path) -> None:
    """A resumed stage trains the same verbalizers as when it started (the optimizer state holds theirs)."""
    saved = json.loads((out / CONFIG_FILE).read_text()) if (out / CONFIG_FILE).exists() else {}
    if cfg.stage == 1 and "teacher_verbalizers" in saved and (saved["teacher_verbalizers"] is None) != (
            cfg.teacher_verbalizers is None):
        how = "with --teacher-verbalizers (teacher side frozen)" if saved["teacher_verbalizers"] else (
            "without --teacher-verbalizers (teacher side trained)")
        raise ValueError(f"--resume: {out} was started {how}; resume it the same way")
    if cfg.student_layers is not None and saved.get("student_layers") != cfg.student_layers:
        raise ValueError(f"--resume: {out} was started with --student-layers {saved.get('student_layers')}; resume "
                         "it with the same layers (or without the option)")


def saved_student_layers(folder: Path | None) -> tuple[int, ...] | None:
    """The layers of the student verbalizers saved in `folder` (None: no folder)."""
    if folder is None or not (folder / META).exists():
        return None
    return tuple(json.loads((folder / META).read_text())["layers"])


def set_up_verbalizers(cfg: TrainConfig, sources: VerbalizerSources, vlm, manifest, device) -> VLsIParts:
    """Both sides' verbalizers on `device` (loaded or new), which of them train, and the shared vocabulary."""
    student = vlm.model
    depth = len(vlm_parts(student).layers)
    # without --student-layers: those of the verbalizers loaded (stage 1's, or the resumed stage's), else the default
    spec = parse_layers(cfg.student_layers) if cfg.student_layers else saved_student_layers(sources.student)
    s_layers = student_layers(spec, depth, sources.teacher_layers)
    teacher = Verbalizers("teacher", sources.teacher_layers, manifest.teacher.hidden_size, cfg.seed,
                          source=teacher_source(manifest))
    s_verbalizers = Verbalizers("student", s_layers, vlm_parts(student).hidden_size, cfg.seed)
    if sources.teacher is not None:
        teacher.load(sources.teacher)
    if sources.student is not None:
        s_verbalizers.load(sources.student)
    train_teacher = cfg.stage == 1 and cfg.teacher_verbalizers is None
    teacher.requires_grad_(train_teacher)
    return VLsIParts(teacher.to(device), s_verbalizers.to(device), manifest.teacher.tokenizer_vocab_size,
                     cfg.match_window, train_teacher)


def trainable_verbalizers(parts: VLsIParts | None) -> list:
    """The verbalizer parameters the stage trains (the student's always; the teacher's in a fresh stage 1)."""
    if parts is None:
        return []
    return list(parts.student.parameters()) + (list(parts.teacher.parameters()) if parts.train_teacher else [])


def verbalizer_modules(parts: VLsIParts | None) -> dict:
    """The checkpoint's extra folders: name -> module with save(folder)."""
    if parts is None:
        return {}
    return {TEACHER_VERBALIZERS_DIR: parts.teacher, STUDENT_VERBALIZERS_DIR: parts.student}
