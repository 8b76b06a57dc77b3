"""How a stage runs on its hardware: precision, gradient checkpointing, FSDP2 sharding, clipping.

Two ways to use several GPUs, both launched by torchrun (see README "Several GPUs"):
- data parallel (default): every rank holds the whole student, Recalibrator and teacher head;
  gradients are averaged across ranks (student/distributed.py).
- `--fsdp`: the student is sharded with FSDP2 (`fully_shard` on each decoder layer, then on the whole
  model), for students that do not fit one GPU. The Recalibrator (2 blocks + 2 projections) and the
  teacher head are replicated on every rank; the Recalibrator's gradients are averaged like in data
  parallel. The head is frozen and kept in the training precision (bf16 on GPU: 2.5 GB for a
  152k x 8192 head).
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.vlm.parts import vlm_parts


def use_bf16(precision: str, device: torch.device) -> bool:
    """auto: bf16 autocast on CUDA, fp32 elsewhere; fp32 / bf16: as named (bf16 also runs on CPU)."""
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"precision must be auto, fp32 or bf16, not {precision!r}")
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(bf16: bool, device: torch.device):
    """Forward passes under bf16 autocast (weights and optimizer state stay fp32); the head losses
    switch autocast off and run in fp32 (student/step.py)."""
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def enable_gradient_checkpointing(student, rec=None) -> None:
    """Recompute decoder-layer activations in the backward pass instead of keeping them. `rec`: what trains beside
    the student (student/methods.py `Beside.module`); one with a `gradient_checkpointing` switch of its own (the
    Recalibrator) recomputes its blocks too."""
    kwargs = {"use_reentrant": False}
    if hasattr(student, "activation_checkpointing_enable"):  # transformers >= 5.x name
        student.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if hasattr(rec, "gradient_checkpointing"):
        rec.gradient_checkpointing = True


def shard_student(student) -> None:
    """FSDP2: one group per decoder layer, one for the rest (embeddings, vision tower, projector, head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in vlm_parts(student).layers:
        fully_shard(layer)
    fully_shard(student)


def gradient_norm(params: list[torch.nn.Parameter]) -> float:
    """The global gradient norm of `params` (0 when none has a gradient), plain and FSDP-sharded (DTensor)
    gradients alike."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    squares = torch.zeros((), dtype=torch.float64, device=grads[0].device)
    for g in grads:
        norm = torch.linalg.vector_norm(g.float())
        if hasattr(norm, "full_tensor"):  # a DTensor norm is a partial value: reduce it across ranks
            norm = norm.full_tensor()
        squares += norm.double() ** 2
    return float(squares.sqrt())


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float, norm: float | None = None) -> float:
    """Scale the gradients of `params` so that their global norm is at most `max_norm`; returns the norm before
    (`norm`: that norm, when the caller has it already)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = gradient_norm(params) if norm is None else norm
    scale = min(max_norm / (total + 1e-6), 1.0)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total
