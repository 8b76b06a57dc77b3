"""What trains in each stage: stage 1 only the Recalibrator; stages 2-3 the student but its vision encoder.

Which parameters are the vision encoder is asked of pipeline/vlm/parts.py (the model's image encoder,
less the merger Qwen-style families keep inside it: that is a projector and trains).
"""

from __future__ import annotations

from pipeline.vlm.parts import vlm_parts


def is_vision_encoder(name: str, student=None) -> bool:
    """Whether parameter `name` belongs to the vision encoder. With `student` (what the trainer passes) the
    answer comes from the model itself; with a name alone (reports on saved weights) from the two module
    names the families of the test matrix use, which is only a guess."""
    if student is not None:
        return name in vlm_parts(student).vision_parameter_names
    return (".vision_tower." in f".{name}" or ".visual." in f".{name}" or ".vision_model." in f".{name}") and (
        "merger" not in name)


def stage_split(student, stage: int, train_vision_encoder: bool = False) -> tuple[list[str], list[str]]:
    """(names of the parameters the stage trains, names it freezes)."""
    vision = vlm_parts(student).vision_parameter_names
    train, frozen = [], []
    for name, _ in student.named_parameters():
        trains = stage in (2, 3) and (train_vision_encoder or name not in vision)
        (train if trains else frozen).append(name)
    return train, frozen


def trainable_student_parameters(student, stage: int, train_vision_encoder: bool = False) -> list:
    """Stage 1: none; stages 2-3: everything but the vision encoder (unless `train_vision_encoder`)."""
    train = set(stage_split(student, stage, train_vision_encoder)[0])
    params = []
    for name, p in student.named_parameters():
        p.requires_grad_(name in train)
        if name in train:
            params.append(p)
    return params
