"""safetensors files of a cache (the teacher head, the teacher's token embeddings) through its Storage.

Shapes come from the file's header alone (two small range reads: the file itself may be GBs in a bucket);
a file is written locally and published atomically (renamed into the folder, or uploaded in one PUT).
"""

from __future__ import annotations

import json
import struct

from pipeline.store.fsutil import sha256_file

MAX_HEADER_BYTES = 100 << 20


def safetensors_shapes(storage, rel: str) -> dict[str, tuple[int, ...]]:
    """{tensor name: shape} from the header; ValueError (or struct.error) when the header is damaged."""
    (size,) = struct.unpack("<Q", storage.read_range(rel, 0, 8))
    if size > MAX_HEADER_BYTES:
        raise ValueError(f"a header of {size} bytes")
    header = json.loads(storage.read_range(rel, 8, 8 + size))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def write_safetensors(storage, rel: str, tensors: dict, file_format: str) -> str:
    """Publish `tensors` as `rel`; returns the file's sha256."""
    from safetensors.torch import save_file

    with storage.writing_file(rel) as tmp:
        save_file(tensors, str(tmp), metadata={"format": file_format})
        return sha256_file(tmp)
