"""What trains in each stage: stage 1 only the Recalibrator; stages 2-3 the student but its vision encoder."""

from __future__ import annotations


def is_vision_encoder(name: str) -> bool:
    """Parameters of the vision encoder (frozen in every stage); projectors/mergers are not."""
    return (".vision_tower." in f".{name}" or ".visual." in f".{name}") and "merger" not in name


def trainable_student_parameters(student, stage: int, train_vision_encoder: bool = False) -> list:
    """Stage 1: none; stages 2-3: everything but the vision encoder (unless `train_vision_encoder`)."""
    params = []
    for name, p in student.named_parameters():
        train = stage in (2, 3) and (train_vision_encoder or not is_vision_encoder(name))
        p.requires_grad_(train)
        if train:
            params.append(p)
    return params
