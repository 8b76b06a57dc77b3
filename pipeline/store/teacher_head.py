"""The teacher head: the file in the cache (teacher/head.safetensors), written once and read by every
student run, and `TeacherHead`, the head as both sides apply it.

Gradients flow through the teacher head into the Recalibrator, so the trainer needs
the head itself, not only cached logits. It is stored in safetensors (no pickle),
in the dtype it was given (bf16 for a bf16 teacher).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch

from schemas import HEAD_BIAS, HEAD_FILE, HEAD_FORMAT, HEAD_SHA256_FILE, HEAD_WEIGHT, CacheFormatError, CacheManifest
from pipeline.store.backend import open_storage
from pipeline.store.tensor_files import safetensors_shapes, write_safetensors
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


def write_teacher_head(cache_dir, weight, bias=None) -> str:
    """Save the head [vocab, d] (+ bias [vocab]) and its sha256 (HEAD_SHA256_FILE); atomic, and a no-op if an
    identical-shape head exists. `cache_dir`: a folder, a URL or an open Storage; returns where the head is."""
    storage = open_storage(cache_dir)
    tensors = {HEAD_WEIGHT: weight.detach().to("cpu").contiguous()}
    if bias is not None:
        tensors[HEAD_BIAS] = bias.detach().to("cpu").contiguous()
    where = f"{storage.location}/{HEAD_FILE}"
    if storage.exists(HEAD_FILE):
        existing = head_shapes(storage)
        if existing != {k: tuple(v.shape) for k, v in tensors.items()}:
            raise CacheFormatError(f"{where}: a head with shapes {existing} is already stored")
        if not storage.exists(HEAD_SHA256_FILE):  # the writer that stored the head died before its digest
            storage.write_atomic(HEAD_SHA256_FILE, (storage.sha256(HEAD_FILE) + "\n").encode())
        return where
    digest = write_safetensors(storage, HEAD_FILE, tensors, HEAD_FORMAT)
    # after the head: a reader that finds the digest finds the head it names (a rerun writes the same bytes)
    storage.write_atomic(HEAD_SHA256_FILE, (digest + "\n").encode())
    return where


def head_sha256(cache) -> str | None:
    """The sha256 recorded beside the head (None for caches written before it was recorded)."""
    storage = open_storage(cache)
    try:
        digest = storage.read_bytes(HEAD_SHA256_FILE).decode().strip()
    except FileNotFoundError:
        return None
    return digest if len(digest) == 64 else None


def head_shapes(cache) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors header alone (two small reads; the head itself may be GBs away)."""
    return safetensors_shapes(open_storage(cache), HEAD_FILE)


def check_teacher_head(cache_dir, manifest: CacheManifest) -> None:
    """Raise CacheFormatError unless the stored head matches the manifest's vocab and hidden sizes."""
    storage = open_storage(cache_dir)
    path = f"{storage.location}/{HEAD_FILE}"
    if not storage.exists(HEAD_FILE):
        raise CacheFormatError(f"{path}: the teacher head is missing; rerun pipeline dump-teacher to write it")
    try:
        shapes = head_shapes(storage)
    except (ValueError, KeyError, TypeError, struct.error) as err:  # a damaged header (JSON errors are ValueErrors)
        raise CacheFormatError(f"{path}: unreadable safetensors file ({err})") from None
    expected = (manifest.teacher.vocab_size, manifest.teacher.hidden_size)
    if shapes.get(HEAD_WEIGHT) != expected:
        raise CacheFormatError(f"{path}: head weight has shape {shapes.get(HEAD_WEIGHT)}, manifest says {expected}")
    if manifest.teacher.head_has_bias and shapes.get(HEAD_BIAS) != expected[:1]:
        raise CacheFormatError(f"{path}: manifest says the head has a bias of shape {expected[:1]}")


def load_teacher_head(cache_dir, manifest: CacheManifest, device="cpu"):
    """(weight, bias or None) as torch tensors, after checking them against the manifest. From an object store
    the file is downloaded once into the local cache (`--cache-dir-local`), keyed by its recorded sha256 and
    checked against it before use."""
    from safetensors.torch import load_file

    storage = open_storage(cache_dir)
    check_teacher_head(storage, manifest)
    path = storage.local_path(HEAD_FILE, sha256=None if storage.is_local else head_sha256(storage))
    tensors = load_file(str(path), device=str(device))
    return tensors[HEAD_WEIGHT], tensors.get(HEAD_BIAS)
