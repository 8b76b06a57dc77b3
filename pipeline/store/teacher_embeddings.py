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

from pathlib import Path

import torch

from schemas import EMBED_FILE, EMBED_FORMAT, EMBED_WEIGHT, CacheFormatError, CacheManifest
from pipeline.store.fsutil import fsync_dir

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


def write_teacher_embeddings(cache_dir: str | Path, model) -> Path:
    """Save the teacher's token embeddings once (atomic; a no-op if the file exists with the same shape)."""
    from safetensors.torch import save_file

    path = Path(cache_dir) / EMBED_FILE
    table = embedding_rows(model)
    if path.exists():
        if embedding_shape(path) != tuple(table.shape):
            raise CacheFormatError(f"{path}: token embeddings of shape {embedding_shape(path)} are already stored, "
                                   f"this teacher's are {tuple(table.shape)}")
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{torch.randint(1 << 30, ()).item()}-{path.name}")
    save_file({EMBED_WEIGHT: table}, str(tmp), metadata={"format": EMBED_FORMAT})
    tmp.replace(path)
    fsync_dir(path.parent)
    return path


def embedding_shape(path: Path) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return tuple(f.get_slice(EMBED_WEIGHT).get_shape())


def has_teacher_embeddings(cache_dir: str | Path) -> bool:
    return (Path(cache_dir) / EMBED_FILE).is_file()


def check_teacher_embeddings(cache_dir: str | Path, manifest: CacheManifest) -> None:
    """CacheFormatError unless the stored table exists, is d wide and holds a row for every head id."""
    path = Path(cache_dir) / EMBED_FILE
    if not path.is_file():
        raise CacheFormatError(
            f"{path} is missing: this cache was written before the teacher's token embeddings were stored, so it "
            "cannot serve --layout teacher-tokens (every other layout works). Dump the teacher again into a new "
            "--out to get them")
    try:
        rows, width = embedding_shape(path)
    except Exception as err:  # safetensors raises its own types on a damaged header
        raise CacheFormatError(f"{path}: unreadable token embeddings ({err})") from None
    if width != manifest.teacher.hidden_size:
        raise CacheFormatError(f"{path}: token embeddings are {width} wide, the manifest's teacher "
                               f"{manifest.teacher.hidden_size}")


def load_teacher_embeddings(cache_dir: str | Path, manifest: CacheManifest, device="cpu") -> torch.Tensor:
    """The [rows, d] table, after `check_teacher_embeddings`."""
    from safetensors.torch import load_file

    check_teacher_embeddings(cache_dir, manifest)
    return load_file(str(Path(cache_dir) / EMBED_FILE), device=str(device))[EMBED_WEIGHT]
