"""The teacher's token embeddings in the cache (teacher/embed_tokens.safetensors), for the Recalibrator layout
that feeds it the answer tokens already said instead of the teacher's hidden states (`--layout teacher-tokens`).

    write_teacher_embeddings(cache, teacher.model)            # the dump, once per cache
    table = load_teacher_embeddings(cache, manifest)           # [rows, d] tensor; CacheFormatError if absent
    table[target_ids[:-1]]                                     # slot t > 0 sees the token said at t - 1

What is stored is what the teacher's input embedding gives each id, row by row through the module itself, so a
family's scale (Gemma multiplies by sqrt(d)) is in the rows. It costs as much as the head: a 152k x 8192 table is
2.5 GB in bf16, once per cache, against terabytes of features; a cache's answers use far fewer rows, but which
ones is known only when every worker is done, and a cache that grows later would need the table again. Caches
written before this file existed serve every other layout; this one tells the user to dump again.
"""

from __future__ import annotations

import torch

from schemas import EMBED_FILE, EMBED_FORMAT, EMBED_WEIGHT, CacheFormatError, CacheManifest
from pipeline.store.backend import open_storage
from pipeline.store.tensor_files import safetensors_shapes, write_safetensors

ROWS_PER_CHUNK = 8192


@torch.no_grad()
def embedding_rows(model) -> torch.Tensor:
    """[rows, d] on the CPU, in the embedding's dtype: the model's input embedding applied to every id."""
    embed = model.get_input_embeddings()
    rows = embed.weight.shape[0]
    device = embed.weight.device
    parts = [embed(torch.arange(s, min(s + ROWS_PER_CHUNK, rows), device=device)).to("cpu")
             for s in range(0, rows, ROWS_PER_CHUNK)]
    return torch.cat(parts).to(embed.weight.dtype).contiguous()


def write_teacher_embeddings(cache_dir, model) -> str:
    """Save the teacher's token embeddings once (atomic; a no-op if the file exists with the same shape).
    `cache_dir`: a folder, an object-store URL or an open Storage."""
    storage = open_storage(cache_dir)
    path = f"{storage.location}/{EMBED_FILE}"
    table = embedding_rows(model)
    if storage.exists(EMBED_FILE):
        if embedding_shape(storage) != tuple(table.shape):
            raise CacheFormatError(f"{path}: token embeddings of shape {embedding_shape(storage)} are already stored, "
                                   f"this teacher's are {tuple(table.shape)}")
        return path
    write_safetensors(storage, EMBED_FILE, {EMBED_WEIGHT: table}, EMBED_FORMAT)
    return path


def embedding_shape(cache) -> tuple[int, ...]:
    return safetensors_shapes(open_storage(cache), EMBED_FILE)[EMBED_WEIGHT]


def has_teacher_embeddings(cache_dir) -> bool:
    return open_storage(cache_dir).exists(EMBED_FILE)


def check_teacher_embeddings(cache_dir, manifest: CacheManifest) -> None:
    """CacheFormatError unless the stored table exists, is d wide and holds a row for every head id."""
    storage = open_storage(cache_dir)
    path = f"{storage.location}/{EMBED_FILE}"
    if not storage.exists(EMBED_FILE):
        raise CacheFormatError(
            f"{path} is missing: this cache was written before the teacher's token embeddings were stored, so it "
            "cannot serve --layout teacher-tokens (every other layout works). Dump the teacher again into a new "
            "--out to get them")
    try:
        rows, width = embedding_shape(storage)
    except Exception as err:  # safetensors raises its own types on a damaged header
        raise CacheFormatError(f"{path}: unreadable token embeddings ({err})") from None
    if width != manifest.teacher.hidden_size:
        raise CacheFormatError(f"{path}: token embeddings are {width} wide, the manifest's teacher "
                               f"{manifest.teacher.hidden_size}")


def load_teacher_embeddings(cache_dir, manifest: CacheManifest, device="cpu") -> torch.Tensor:
    """The [rows, d] table, after `check_teacher_embeddings` (from an object store: downloaded once)."""
    from safetensors.torch import load_file

    storage = open_storage(cache_dir)
    check_teacher_embeddings(storage, manifest)
    return load_file(str(storage.local_path(EMBED_FILE)), device=str(device))[EMBED_WEIGHT]
