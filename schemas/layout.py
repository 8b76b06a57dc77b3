"""Where things live inside a cache folder, and the grammar of image references.

    cache/
      manifest.json                   MANIFEST_FILE
      teacher/head.safetensors        HEAD_FILE: tensors HEAD_WEIGHT [vocab, d] and, if any, HEAD_BIAS [vocab]
      teacher/head.safetensors.sha256 HEAD_SHA256_FILE: hex sha256 of HEAD_FILE, written after it
      teacher/embed_tokens.safetensors  EMBED_FILE: EMBED_WEIGHT [rows, d], what the teacher's input embedding
                                      gives each token id (its scale included); caches before it have none
      teacher/hf/                     TEACHER_HF_DIR: config, tokenizer/processor files, chat template
      shards/<name>/                  SHARDS_DIR; a shard being written is shards/TMP_PREFIX<...> (local folders)
      commits/<name>.json             COMMITS_DIR: object stores only, the commit object of shard <name> (COMMIT.md)
      locks/<writer>.lock             LOCKS_DIR: held while that writer runs
      images/<2 hex>/<sha256>.png     IMAGES_DIR: pixels of images that came as bytes or PIL images
      responses/<writer>.jsonl        RESPONSES_DIR: teacher-written answers (responses = generate)

Image references (the `images` column of samples.parquet):
    path:<posix path relative to the manifest's data.image_root>
    sha256:<64 hex digits of the PNG bytes>        pixels under IMAGES_DIR
"""

from __future__ import annotations

import re

MANIFEST_FILE = "manifest.json"
TEACHER_DIR = "teacher"
HEAD_FILE = f"{TEACHER_DIR}/head.safetensors"
HEAD_WEIGHT = "weight"
HEAD_BIAS = "bias"
HEAD_FORMAT = "genrecal-teacher-head"
HEAD_SHA256_FILE = f"{HEAD_FILE}.sha256"
TEACHER_HF_DIR = f"{TEACHER_DIR}/hf"
EMBED_FILE = f"{TEACHER_DIR}/embed_tokens.safetensors"
EMBED_WEIGHT = "weight"
EMBED_FORMAT = "genrecal-teacher-token-embeddings"
SHARDS_DIR = "shards"
COMMITS_DIR = "commits"
COMMIT_SUFFIX = ".json"
LOCKS_DIR = "locks"
IMAGES_DIR = "images"
RESPONSES_DIR = "responses"

PATH_REF = "path:"
SHA256_REF = "sha256:"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def path_ref(relative_posix: str) -> str:
    return PATH_REF + relative_posix


def sha256_ref(hex_digest: str) -> str:
    if not _SHA256.match(hex_digest):
        raise ValueError(f"not a sha256 hex digest: {hex_digest!r}")
    return SHA256_REF + hex_digest


def parse_image_ref(ref: str) -> tuple[str, str]:
    """('path', relative posix path) or ('sha256', hex digest); ValueError for anything else."""
    if ref.startswith(PATH_REF) and len(ref) > len(PATH_REF):
        return "path", ref[len(PATH_REF):]
    if ref.startswith(SHA256_REF) and _SHA256.match(ref[len(SHA256_REF):]):
        return "sha256", ref[len(SHA256_REF):]
    raise ValueError(f"malformed image reference {ref!r}: expected 'path:<relative path>' or 'sha256:<64 hex digits>'")


def image_file(digest: str) -> str:
    """Cache-relative file of a sha256-referenced image."""
    return f"{IMAGES_DIR}/{digest[:2]}/{digest}.png"
