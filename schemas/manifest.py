"""`manifest.json`: what a cache holds, which teacher produced it, and how it is encoded.

One manifest per cache folder. The first writer creates it; every later writer
(another worker, a rerun) must bring an identical manifest up to the fields in
`VOLATILE_FIELDS`, or it is refused with `CacheMismatchError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from schemas.dataclass_io import from_dict, to_dict
from schemas.layout import MANIFEST_FILE
from schemas.errors import CacheFormatError, CacheMismatchError

FORMAT_NAME = "genrecal-teacher-cache"
FORMAT_VERSION = 2
"""2: intermediate teacher layers (`CacheManifest.layers`, `TeacherInfo.num_hidden_layers`, per-layer arrays
`layer_features_<l>`). Version 1 caches read as caches without layers (schemas/DESIGN.md, "Intermediate layers")."""

# Fields a version-1 manifest cannot hold: (dotted path, value a version-1 cache implies).
FIELDS_SINCE_VERSION_2 = (("layers", ()), ("teacher.num_hidden_layers", None))

FeatureEncodingName = Literal["bf16", "fp8_e4m3", "int8"]
CodecName = Literal["none", "zstd1", "zstd3", "blosc-zstd3-shuffle", "blosc-zstd3-bitshuffle", "blosc-lz4-bitshuffle"]
CODEC_NAMES: tuple[str, ...] = get_args(CodecName)

# Stated worst-case per-token cosine similarity to the source; the writer refuses a sample that misses it.
MIN_COSINE = {"bf16": 1.0, "fp8_e4m3": 0.999, "int8": 0.999}


@dataclass(frozen=True)
class TeacherInfo:
    """The teacher model whose outputs the cache holds."""

    model: str
    """Model as given on the command line: alias, hub id, or local folder."""
    family: str
    """transformers `model_type` of the teacher (e.g. qwen2_vl)."""
    architecture: str
    """transformers class name of the teacher (e.g. Qwen2VLForConditionalGeneration)."""
    hidden_size: int
    """Width d of the final hidden states stored as features."""
    vocab_size: int
    """Rows of the teacher head, including padding rows (e.g. 152064 for Qwen2-VL-72B)."""
    tokenizer_vocab_size: int
    """len(tokenizer) of the teacher; may be smaller than vocab_size (padded head)."""
    dtype: str
    """Dtype the teacher forward pass ran in (bfloat16, float32)."""
    tokenizer_fingerprint: str
    """sha256 over the tokenizer's vocabulary and special tokens; target ids are only meaningful with it."""
    end_of_turn_token_ids: tuple[int, ...]
    """Token ids that close an assistant turn in the teacher's chat template."""
    revision: str | None = None
    """Hub revision (commit) of the teacher, when loaded from a hub."""
    chat_template: str | None = None
    """The teacher's chat template text (also saved under teacher/)."""
    logit_scale: float = 1.0
    """Multiplier the family applies to head outputs before softmax (1.0 for most families)."""
    final_logit_softcapping: float | None = None
    """tanh soft-cap applied to logits by the family (Gemma-style), or null."""
    head_has_bias: bool = False
    """Whether teacher/head.safetensors holds a `bias` tensor besides `weight`."""
    num_hidden_layers: int | None = None
    """Decoder layers of the teacher's text stack (as pipeline/vlm/parts.py finds them): `features` are its
    transformers hidden state of this index (after the final norm). Null in caches written before format 2."""

    def __post_init__(self):
        if self.num_hidden_layers is not None and self.num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be positive, got {self.num_hidden_layers}")
        if self.hidden_size <= 0 or self.vocab_size <= 0:
            raise ValueError("hidden_size and vocab_size must be positive")
        if self.tokenizer_vocab_size > self.vocab_size:
            raise ValueError(
                f"tokenizer_vocab_size {self.tokenizer_vocab_size} exceeds head rows vocab_size {self.vocab_size}"
            )


@dataclass(frozen=True)
class ResponsesInfo:
    """Where the answers (the training targets) came from."""

    source: Literal["dataset", "generate"]
    """`dataset`: the data's own answers; `generate`: written by the teacher."""
    backend: str | None = None
    """Generation backend (vllm, hf) when source is generate."""
    sampling: dict[str, Any] = field(default_factory=dict)
    """Effective sampling settings of the generation: the teacher's generation config with the dump's options
    on top (max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed, stop_token_ids), as
    both backends apply them. Caches written before these were recorded hold the options alone
    (max_new_tokens, temperature, top_p, seed)."""
    keep_if_correct: bool = False
    """Generated answers were kept only when they agreed with the reference answer."""
    on_incorrect: Literal["reference", "reject"] | None = None
    """What happened to a generated answer that disagreed: fall back to the reference, or reject."""


@dataclass(frozen=True)
class DataInfo:
    """The data set the teacher ran over."""

    source: str
    """Data source as given (a file, a folder, or a built-in name like easy-vqa:train)."""
    image_root: str | None = None
    """Absolute root folder that `path:` image references in the sample table are relative to (resolved at dump
    time: the given --image-root, or a built-in data set's own folder)."""


@dataclass(frozen=True)
class FeatureEncoding:
    """How teacher hidden states are stored."""

    encoding: FeatureEncodingName
    """bf16: exact bit view as uint16; fp8_e4m3 / int8: lossy, with a float32 scale per token."""
    source_dtype: str = "bfloat16"
    """Dtype of the features before encoding."""
    lossless: bool = True
    """True only for bf16 from a bf16 source: decoded features equal the source bit for bit."""
    min_cosine: float = 1.0
    """Stated lower bound on per-token cosine similarity between decoded and source features."""

    def __post_init__(self):
        if self.encoding != "bf16" and self.lossless:
            raise ValueError(f"feature encoding {self.encoding} is lossy; lossless must be false")
        if not 0.0 < self.min_cosine <= 1.0:
            raise ValueError("min_cosine must be in (0, 1]")

    @property
    def has_scales(self) -> bool:
        return self.encoding != "bf16"

    @property
    def stored_dtype(self) -> str:
        return {"bf16": "uint16", "fp8_e4m3": "uint8", "int8": "int8"}[self.encoding]


@dataclass(frozen=True)
class TopKInfo:
    """Top-k teacher log-probabilities stored per position (k = 0: none stored)."""

    k: int
    """Number of most likely tokens kept per position, in descending order."""
    logprob_dtype: Literal["float16", "float32"] = "float16"
    """Dtype of the stored log-probabilities."""
    temperature: float = 1.0
    """Softmax temperature the log-probs were computed at."""

    def __post_init__(self):
        if self.k < 0:
            raise ValueError("k must be >= 0")


@dataclass(frozen=True)
class PositionsInfo:
    """Which sequence positions have stored features."""

    scheme: Literal["next_token"] = "next_token"
    """features[t] is the teacher's final hidden state at the position whose next token is
    target_ids[t]: the last prompt position, then every answer position but the last. The
    answer ends with the chat template's end-of-turn token."""
    question_features_fraction: float = 0.0
    """Fraction of samples that also store features at every prompt position (image + question)."""

    def __post_init__(self):
        if not 0.0 <= self.question_features_fraction <= 1.0:
            raise ValueError("question_features_fraction must be in [0, 1]")


@dataclass(frozen=True)
class StorageInfo:
    """Zarr layout and codecs."""

    shard_target_tokens: int = 8192
    """A writer commits a shard once it holds at least this many stored positions."""
    chunk_tokens: int = 256
    """Zarr inner chunk length along the token axis (the unit of a random read)."""
    codecs: dict[str, CodecName] = field(
        default_factory=lambda: {
            "features": "blosc-zstd3-shuffle",
            "ids": "blosc-zstd3-bitshuffle",
            "logprobs": "blosc-zstd3-bitshuffle",
            "scalars": "blosc-zstd3-bitshuffle",
        }
    )
    """Codec per array group (features, ids, logprobs, scalars); a crc32c checksum follows every chunk.
    Defaults from bench/results/cache_bench.md: byte shuffle for features (1.29-1.33x on real and
    LLM-like features; bitshuffle falls to 1.03x when exponents spread), bitshuffle for the rest."""

    def __post_init__(self):
        if self.shard_target_tokens <= 0 or self.chunk_tokens <= 0:
            raise ValueError("shard_target_tokens and chunk_tokens must be positive")
        missing = {"features", "ids", "logprobs", "scalars"} - set(self.codecs)
        if missing:
            raise ValueError(f"codecs lacks group(s) {sorted(missing)}")


@dataclass(frozen=True)
class CacheManifest:
    """Top-level description of a teacher cache (manifest.json)."""

    teacher: TeacherInfo
    """The teacher model."""
    responses: ResponsesInfo
    """Where the answers came from."""
    data: DataInfo
    """The data set."""
    features: FeatureEncoding
    """Feature encoding."""
    topk: TopKInfo
    """Top-k log-prob settings."""
    positions: PositionsInfo = field(default_factory=PositionsInfo)
    """Stored positions."""
    storage: StorageInfo = field(default_factory=StorageInfo)
    """Zarr layout and codecs."""
    layers: tuple[int, ...] = ()
    """Intermediate teacher layers stored besides `features` (ascending; empty: none). Layer l is transformers'
    `output_hidden_states` index l: the output of decoder layer l (1-based), before any final norm; 0 would be the
    embedding output and teacher.num_hidden_layers the final layer, which is `features`, so 1 <= l <
    num_hidden_layers. Stored at the same positions and in the same encoding as `features`, one array per layer
    (`layer_features_<l>`, with `layer_feature_scales_<l>` for lossy encodings). New in format 2."""
    format: str = FORMAT_NAME
    """Always genrecal-teacher-cache."""
    format_version: int = FORMAT_VERSION
    """Cache format version; readers refuse versions newer than their own."""
    tool_version: str = "unknown"
    """Version of the package that created the cache."""
    created_at: str = ""
    """ISO-8601 UTC time the manifest was first written."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form settings of the producing command, kept for provenance."""

    def __post_init__(self):
        if list(self.layers) != sorted(set(self.layers)) or any(l < 1 for l in self.layers):
            raise ValueError(f"layers must be distinct positive layer indices in ascending order, got {list(self.layers)}")
        count = self.teacher.num_hidden_layers
        if count is not None and self.layers and self.layers[-1] >= count:
            raise ValueError(f"layers {list(self.layers)}: the teacher has {count} decoder layers, so an intermediate "
                             f"layer is 1..{count - 1} ({count} is the final layer, stored as features)")
        if self.format_version < 2:
            newer = [path for path, old in FIELDS_SINCE_VERSION_2 if _get(self, path) != old]
            if newer:
                raise ValueError(f"format_version {self.format_version} cannot hold field(s) {newer} (new in format 2)")

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_FILE) -> "CacheManifest":
        check_format_header(data, where, FORMAT_NAME)
        return from_dict(cls, data, where)

    def identity(self) -> dict:
        """The fields that every writer of one cache must agree on."""
        d = self.to_dict()
        for name in VOLATILE_FIELDS:
            d.pop(name)
        return d

    def check_compatible(self, other: "CacheManifest", where: str) -> None:
        """Raise CacheMismatchError listing every differing field."""
        diffs = _diff(self.identity(), other.identity())
        if diffs:
            lines = "\n".join(f"  {path}: cache has {a!r}, this run has {b!r}" for path, a, b in diffs)
            raise CacheMismatchError(
                f"{where}: this run's settings differ from the cache's manifest:\n{lines}\n"
                "Use another --out folder, or rerun with the settings the cache was made with."
            )


VOLATILE_FIELDS = ("tool_version", "created_at")


def as_format_version(manifest: CacheManifest, version: int) -> CacheManifest:
    """`manifest` written as an older format version, for a run that resumes an older cache: only possible when
    it uses nothing that version lacks (a version-1 cache is a version-2 cache without layers). Otherwise the
    manifest is returned unchanged, and the identity check reports every field that differs."""
    if version >= manifest.format_version or version < 1 or manifest.layers:
        return manifest
    return replace(manifest, format_version=version, teacher=replace(manifest.teacher, num_hidden_layers=None))


def require_layers(manifest: CacheManifest, wanted: tuple[int, ...] | None, where: str) -> tuple[int, ...]:
    """The intermediate layers a method reads from a cache: `wanted` (all the cache's layers when None).

    Raises ValueError naming the cache (`where`), the layers it has, and the dump command that writes the missing
    ones, when the cache lacks any of `wanted` (or, with None, has no layers at all). A cache's layers are fixed
    when it is created (they are part of its manifest identity), so the fix is a new cache, not a rerun.
    """
    have = tuple(manifest.layers)
    needed = tuple(have if wanted is None else wanted)
    missing = [l for l in needed if l not in have] if wanted is not None else ([] if have else ["any"])
    if not missing:
        return needed
    holds = ",".join(map(str, have)) if have else "none: written before format 2 or without --layers" + (
        f" (this cache is format version {manifest.format_version})" if manifest.format_version < 2 else "")
    asked = "intermediate teacher layers" if wanted is None else f"teacher layers {','.join(map(str, wanted))}"
    count = manifest.teacher.num_hidden_layers
    valid = f" (this teacher: 1..{count - 1})" if count else ""
    example = ",".join(map(str, wanted)) if wanted else "8,16,24"
    raise ValueError(
        f"{where}: this method needs {asked}, but the cache has layers {holds}. A cache's layers are fixed when it is "
        f"written: dump the teacher again into a new folder, e.g. `pipeline dump-teacher --model "
        f"{manifest.teacher.model} --data {manifest.data.source} ... --layers {example} --out NEW_CACHE` "
        f"(or --layers every:K){valid}, and train from that cache"
    )


def _get(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def check_format_header(data: Any, where: str, expected_format: str) -> None:
    """Refuse files of another format or of a newer version before looking at any other field."""
    if not isinstance(data, dict):
        raise CacheFormatError(f"{where}: expected a JSON object")
    if data.get("format", expected_format) != expected_format:
        raise CacheFormatError(f"{where}: format is {data.get('format')!r}, expected {expected_format!r}")
    version = data.get("format_version", FORMAT_VERSION)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CacheFormatError(f"{where}: field 'format_version': expected int, got {version!r}")
    if version > FORMAT_VERSION:
        raise CacheFormatError(
            f"{where}: cache format version {version} is newer than this tool supports "
            f"({FORMAT_VERSION}); upgrade the genrecal package to read it."
        )
    if version < 1:
        raise CacheFormatError(f"{where}: invalid format_version {version}")


def read_manifest(cache_dir: str | Path) -> CacheManifest:
    path = Path(cache_dir) / MANIFEST_FILE
    return CacheManifest.from_dict(read_json(path), str(path))


def read_json(path: Path) -> Any:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise CacheFormatError(f"{path}: file not found; is this a cache folder?") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise CacheFormatError(f"{path}: not valid JSON ({err})") from None


def _diff(a: Any, b: Any, path: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if a == b else [(path, a, b)]
