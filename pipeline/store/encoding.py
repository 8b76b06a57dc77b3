"""Feature encodings: exact bf16 bit views, and lossy fp8-e4m3 / int8 with one scale per token.

Encoders take a torch tensor or a numpy array of shape [tokens, d]. A bf16 tensor is
stored as its uint16 bit pattern (zarr has no bfloat16), so it round-trips bit for
bit. Decoders use numpy only, so a reader needs no torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np

FP8_E4M3_MAX = 448.0


class EncodingBoundError(ValueError):
    """A lossy feature encoding missed the cosine bound the cache manifest states."""

INT8_MAX = 127.0


def encode_features(x: Any, encoding: str) -> tuple[np.ndarray, np.ndarray | None]:
    """[T, d] features -> (stored payload, per-token float32 scales or None)."""
    if encoding == "bf16":
        return to_bf16_bits(x), None
    values = to_float32(x)
    absmax = np.abs(values).max(axis=1) if values.shape[0] and values.shape[1] else np.zeros(len(values))
    absmax = absmax.astype(np.float32)
    if encoding == "int8":
        scales = np.where(absmax > 0, absmax / INT8_MAX, 1.0).astype(np.float32)
        q = np.clip(np.rint(values / scales[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
        return q, scales
    if encoding == "fp8_e4m3":
        import torch  # numpy has no float8; the teacher side always has torch

        scales = np.where(absmax > 0, absmax / FP8_E4M3_MAX, 1.0).astype(np.float32)
        scaled = torch.from_numpy(values / scales[:, None])
        q = scaled.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        return q, scales
    raise ValueError(f"unknown feature encoding {encoding!r}; choose bf16, fp8_e4m3 or int8")


def min_cosine(source: Any, decoded: np.ndarray) -> float:
    """Worst per-token cosine similarity between source features and their decoded encoding (1.0 if empty)."""
    x = to_float32(source).astype(np.float64)
    y = np.asarray(decoded, dtype=np.float64)
    if not x.size:
        return 1.0
    norms = np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1)
    dots = (x * y).sum(axis=1)
    cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), 1.0)
    return float(cos.min())


def check_lossy_bound(source: Any, decoded: np.ndarray, encoding: str, bound: float, where: str) -> None:
    """Raise when a lossy encoding misses the bound the manifest states (e.g. int8 on massive activations)."""
    if encoding == "bf16":
        return
    worst = min_cosine(source, decoded)
    if worst < bound:
        raise EncodingBoundError(
            f"{where}: {encoding} features reach cosine {worst:.5f} < the stated {bound}; these features have "
            "outliers this encoding cannot keep: use fp8_e4m3 or bf16"
        )


def decode_features(payload: np.ndarray, scales: np.ndarray | None, encoding: str) -> np.ndarray:
    """Stored payload -> float32 [T, d]."""
    if encoding == "bf16":
        return bf16_bits_to_float32(payload)
    if scales is None:
        raise ValueError(f"{encoding} features need their per-token scales")
    if encoding == "int8":
        return payload.astype(np.float32) * scales[:, None]
    if encoding == "fp8_e4m3":
        return FP8_E4M3_TABLE[payload] * scales[:, None]
    raise ValueError(f"unknown feature encoding {encoding!r}")


def to_bf16_bits(x: Any) -> np.ndarray:
    """bf16 bit pattern as uint16. Exact for bf16 tensors and uint16 arrays; rounds float32 to nearest even."""
    if _is_torch(x):
        import torch

        t = x.detach().to("cpu")
        if t.dtype != torch.bfloat16:
            t = t.to(torch.bfloat16)
        return t.contiguous().view(torch.int16).numpy().view(np.uint16)
    arr = np.asarray(x)
    if arr.dtype == np.uint16:
        return np.ascontiguousarray(arr)
    return float32_to_bf16_bits(arr.astype(np.float32))


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    out = rounded.astype(np.uint16)
    out[np.isnan(x)] = 0x7FC0
    return out


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_float32(x: Any) -> np.ndarray:
    if _is_torch(x):
        return x.detach().to("cpu").float().numpy()
    arr = np.asarray(x)
    if arr.dtype == np.uint16:  # bf16 bit pattern
        return bf16_bits_to_float32(arr)
    return arr.astype(np.float32)


def _fp8_e4m3fn_table() -> np.ndarray:
    """Value of every fp8-e4m3fn byte (1 sign, 4 exponent bits with bias 7, 3 mantissa bits; no inf)."""
    b = np.arange(256)
    sign = np.where(b >> 7, -1.0, 1.0)
    exponent, mantissa = (b >> 3) & 0xF, b & 0x7
    normal = (1 + mantissa / 8) * np.exp2(exponent - 7.0)
    subnormal = (mantissa / 8) * np.exp2(-6.0)
    values = sign * np.where(exponent == 0, subnormal, normal)
    values[(exponent == 0xF) & (mantissa == 0x7)] = np.nan
    return values.astype(np.float32)


FP8_E4M3_TABLE = _fp8_e4m3fn_table()


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")
