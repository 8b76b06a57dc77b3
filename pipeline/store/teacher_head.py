"""The teacher head: the file in the cache (teacher/head.safetensors), written once and read by every
student run, and `TeacherHead`, the head as both sides apply it.

Gradients flow through the teacher head into the Recalibrator, so the trainer needs
the head itself, not only cached logits. It is stored in safetensors (no pickle),
in the dtype it was given (bf16 for a bf16 teacher).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from schemas import HEAD_BIAS, HEAD_FILE, HEAD_FORMAT, HEAD_WEIGHT, CacheFormatError, CacheManifest
from pipeline.store.fsutil import fsync_dir
from pipeline.vlm.parts import scale_and_cap


@dataclass
class TeacherHead:
    """The teacher's output layer and the logit transforms its family applies."""

    weight: torch.Tensor  # [vocab, d]
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """float32 logits [T, vocab] for features [T, d] (matmul in the head's dtype, like the model's lm_head)."""
        x = torch.nn.functional.linear(features.to(self.weight.dtype), self.weight, self.bias).float()
        return scale_and_cap(x, self.logit_scale, self.softcap)


def write_teacher_head(cache_dir: str | Path, weight, bias=None) -> Path:
    """Save the head [vocab, d] (+ bias [vocab]); atomic, and a no-op if an identical-shape head exists."""
    from safetensors.torch import save_file

    path = Path(cache_dir) / HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {HEAD_WEIGHT: weight.detach().to("cpu").contiguous()}
    if bias is not None:
        tensors[HEAD_BIAS] = bias.detach().to("cpu").contiguous()
    if path.exists():
        existing = head_shapes(path)
        if existing != {k: tuple(v.shape) for k, v in tensors.items()}:
            raise CacheFormatError(f"{path}: a head with shapes {existing} is already stored")
        return path
    tmp = path.with_name(f".tmp-{torch.randint(1 << 30, ()).item()}-{path.name}")
    save_file(tensors, str(tmp), metadata={"format": HEAD_FORMAT})
    tmp.replace(path)
    fsync_dir(path.parent)
    return path


def head_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def check_teacher_head(cache_dir: str | Path, manifest: CacheManifest) -> None:
    """Raise CacheFormatError unless the stored head matches the manifest's vocab and hidden sizes."""
    path = Path(cache_dir) / HEAD_FILE
    if not path.exists():
        raise CacheFormatError(f"{path}: the teacher head is missing; rerun pipeline dump-teacher to write it")
    try:
        shapes = head_shapes(path)
    except Exception as err:  # safetensors raises its own error types on a damaged header
        raise CacheFormatError(f"{path}: unreadable safetensors file ({err})") from None
    expected = (manifest.teacher.vocab_size, manifest.teacher.hidden_size)
    if shapes.get(HEAD_WEIGHT) != expected:
        raise CacheFormatError(f"{path}: head weight has shape {shapes.get(HEAD_WEIGHT)}, manifest says {expected}")
    if manifest.teacher.head_has_bias and shapes.get(HEAD_BIAS) != expected[:1]:
        raise CacheFormatError(f"{path}: manifest says the head has a bias of shape {expected[:1]}")


def load_teacher_head(cache_dir: str | Path, manifest: CacheManifest, device="cpu"):
    """(weight, bias or None) as torch tensors, after checking them against the manifest."""
    from safetensors.torch import load_file

    check_teacher_head(cache_dir, manifest)
    tensors = load_file(str(Path(cache_dir) / HEAD_FILE), device=str(device))
    return tensors[HEAD_WEIGHT], tensors.get(HEAD_BIAS)
