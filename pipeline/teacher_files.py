"""The teacher head in the cache (teacher/head.safetensors), written once and read by every student run.

Gradients flow through the teacher head into the Recalibrator, so the trainer needs
the head itself, not only cached logits. It is stored in safetensors (no pickle),
in the dtype it was given (bf16 for a bf16 teacher).
"""

from __future__ import annotations

from pathlib import Path

from schemas import HEAD_FILE, CacheFormatError, CacheManifest
from pipeline.fsutil import fsync_dir


def write_teacher_head(cache_dir: str | Path, weight, bias=None) -> Path:
    """Save the head [vocab, d] (+ bias [vocab]); atomic, and a no-op if an identical-shape head exists."""
    import torch
    from safetensors.torch import save_file

    path = Path(cache_dir) / HEAD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"weight": weight.detach().to("cpu").contiguous()}
    if bias is not None:
        tensors["bias"] = bias.detach().to("cpu").contiguous()
    if path.exists():
        existing = head_shapes(path)
        if existing != {k: tuple(v.shape) for k, v in tensors.items()}:
            raise CacheFormatError(f"{path}: a head with shapes {existing} is already stored")
        return path
    tmp = path.with_name(f".tmp-{torch.randint(1 << 30, ()).item()}-{path.name}")
    save_file(tensors, str(tmp), metadata={"format": "genrecal-teacher-head"})
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
    if shapes.get("weight") != expected:
        raise CacheFormatError(f"{path}: head weight has shape {shapes.get('weight')}, manifest says {expected}")
    if manifest.teacher.head_has_bias and shapes.get("bias") != expected[:1]:
        raise CacheFormatError(f"{path}: manifest says the head has a bias of shape {expected[:1]}")


def load_teacher_head(cache_dir: str | Path, manifest: CacheManifest, device="cpu"):
    """(weight, bias or None) as torch tensors, after checking them against the manifest."""
    from safetensors.torch import load_file

    check_teacher_head(cache_dir, manifest)
    tensors = load_file(str(Path(cache_dir) / HEAD_FILE), device=str(device))
    return tensors["weight"], tensors.get("bias")
