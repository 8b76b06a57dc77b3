"""One shard: a Zarr v3 group of ragged arrays plus `index.json` and two Parquet tables.

A shard is the unit of ownership and of atomic commit: one writer fills it under a
temporary name and renames it into `shards/` when every file is flushed. Arrays are
ragged by sample: per-token arrays are concatenated along axis 0, and
`offsets[i]:offsets[i+1]` is sample i's slice (`question_offsets` for question features).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from schemas.dataclass_io import from_dict, to_dict
from schemas.errors import CacheFormatError
from schemas.manifest import FORMAT_VERSION, CacheManifest, check_format_header

SHARD_FORMAT_NAME = "genrecal-teacher-cache/shard"
INDEX_FILE = "index.json"
SAMPLES_FILE = "samples.parquet"
REJECTS_FILE = "rejects.parquet"
ARRAYS_DIR = "arrays"
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class ArraySpec:
    """Contract for one array: its codec group, its rows, and how its dtype and width follow from the manifest."""

    group: str
    rows: str  # "samples+1", "tokens" or "question_tokens"
    width: str | None  # None (1-D), "hidden" or "k"
    dtype: str  # a numpy dtype name, or "features" / "logprobs" (taken from the manifest)
    present: str = "always"  # "always", "scales" (lossy encodings), "topk" (k > 0), "layers" (one per layer)


ARRAY_SPECS: dict[str, ArraySpec] = {
    "offsets": ArraySpec("ids", "samples+1", None, "int64"),
    "target_ids": ArraySpec("ids", "tokens", None, "int32"),
    "features": ArraySpec("features", "tokens", "hidden", "features"),
    "feature_scales": ArraySpec("scalars", "tokens", None, "float32", present="scales"),
    "logsumexp": ArraySpec("scalars", "tokens", None, "float32"),
    "topk_ids": ArraySpec("ids", "tokens", "k", "int32", present="topk"),
    "topk_logprobs": ArraySpec("logprobs", "tokens", "k", "logprobs", present="topk"),
    "tail_logmass": ArraySpec("scalars", "tokens", None, "float32", present="topk"),
    "question_offsets": ArraySpec("ids", "samples+1", None, "int64"),
    "question_features": ArraySpec("features", "question_tokens", "hidden", "features"),
    "question_feature_scales": ArraySpec("scalars", "question_tokens", None, "float32", present="scales"),
}

# One pair per intermediate layer l of `CacheManifest.layers` (format 2): the hidden state of layer l at the
# rows of `features`, encoded like them. Names are the template with `{layer}` filled in (layer_features_8).
LAYER_FEATURES = "layer_features_{layer}"
LAYER_FEATURE_SCALES = "layer_feature_scales_{layer}"
LAYER_ARRAY_SPECS: dict[str, ArraySpec] = {
    LAYER_FEATURES: ArraySpec("features", "tokens", "hidden", "features", present="layers"),
    LAYER_FEATURE_SCALES: ArraySpec("scalars", "tokens", None, "float32", present="layers+scales"),
}


def layer_array_names(layer: int) -> tuple[str, str]:
    """(features array, scales array) names of intermediate layer `layer` in a shard."""
    return LAYER_FEATURES.format(layer=layer), LAYER_FEATURE_SCALES.format(layer=layer)


def array_layer(name: str) -> int | None:
    """The layer of a per-layer array name (layer_features_8 -> 8), None for any other array."""
    for template in LAYER_ARRAY_SPECS:
        prefix = template.removesuffix("{layer}")
        rest = name.removeprefix(prefix)
        if rest != name and rest.isdigit() and str(int(rest)) == rest:
            return int(rest)
    return None


def array_spec(name: str) -> ArraySpec:
    """The contract of array `name`: a fixed array of ARRAY_SPECS or a per-layer one; KeyError for others."""
    if name in ARRAY_SPECS:
        return ARRAY_SPECS[name]
    layer = array_layer(name)
    if layer is not None:
        for template, spec in LAYER_ARRAY_SPECS.items():
            if template.format(layer=layer) == name:
                return spec
    raise KeyError(f"unknown cache array {name!r}")


def array_specs(manifest: CacheManifest) -> dict[str, ArraySpec]:
    """Name -> spec of every array a shard of this cache may hold: ARRAY_SPECS, then per layer its pair."""
    out = dict(ARRAY_SPECS)
    for layer in manifest.layers:
        for template, spec in LAYER_ARRAY_SPECS.items():
            out[template.format(layer=layer)] = spec
    return out


def expected_arrays(manifest: CacheManifest) -> dict[str, tuple[str, int | None]]:
    """Array name -> (dtype, width or None) for every array a shard of this cache must hold."""
    out = {}
    for name, spec in array_specs(manifest).items():
        if spec.present in ("scales", "layers+scales") and not manifest.features.has_scales:
            continue
        if spec.present == "topk" and manifest.topk.k == 0:
            continue
        dtype = {
            "features": manifest.features.stored_dtype,
            "logprobs": manifest.topk.logprob_dtype,
        }.get(spec.dtype, spec.dtype)
        width = {"hidden": manifest.teacher.hidden_size, "k": manifest.topk.k, None: None}[spec.width]
        out[name] = (dtype, width)
    return out


@dataclass(frozen=True)
class ArrayRecord:
    """What the writer wrote for one array."""

    dtype: str
    """numpy dtype name of the stored array."""
    shape: tuple[int, ...]
    """Shape of the stored array."""
    sha256: str
    """sha256 of the array's C-order bytes (independent of codecs)."""
    stored_bytes: int
    """Bytes the array takes on disk, metadata included."""


@dataclass(frozen=True)
class ShardIndex:
    """index.json of one shard."""

    name: str
    """Shard folder name under shards/."""
    writer_id: str
    """Id of the writer that owned this shard."""
    created_at: str
    """ISO-8601 UTC commit time."""
    sample_ids: tuple[str, ...]
    """Sample ids in row order."""
    num_tokens: tuple[int, ...]
    """Stored positions per sample (length of its target_ids)."""
    num_question_tokens: tuple[int, ...]
    """Stored question positions per sample (0 when it has no question features)."""
    rejected_ids: tuple[str, ...]
    """Samples this writer rejected while filling the shard (details in rejects.parquet)."""
    arrays: dict[str, ArrayRecord]
    """Per-array record."""
    files: dict[str, str]
    """sha256 of every file in the shard folder except index.json, by relative path."""
    format: str = SHARD_FORMAT_NAME
    """Always genrecal-teacher-cache/shard."""
    format_version: int = FORMAT_VERSION
    """Cache format version of this shard (the manifest's: a resumed version-1 cache gets version-1 shards)."""

    def __post_init__(self):
        n = len(self.sample_ids)
        if len(self.num_tokens) != n or len(self.num_question_tokens) != n:
            raise ValueError(f"sample_ids has {n} entries but num_tokens/num_question_tokens do not")
        if len(set(self.sample_ids)) != n:
            raise ValueError("sample_ids holds duplicates")

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    @property
    def total_question_tokens(self) -> int:
        return sum(self.num_question_tokens)

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "ShardIndex":
        check_format_header(data, where, SHARD_FORMAT_NAME)
        return from_dict(cls, data, where)

    def check_against(self, manifest: CacheManifest, where: str) -> None:
        """Every expected array is recorded with the dtype and shape the manifest implies."""
        rows = {
            "samples+1": len(self.sample_ids) + 1,
            "tokens": self.total_tokens,
            "question_tokens": self.total_question_tokens,
        }
        expected = expected_arrays(manifest)
        extra = sorted(set(self.arrays) - set(expected))
        if extra:
            raise CacheFormatError(f"{where}: unexpected array(s) {extra} for this cache's manifest")
        for name, (dtype, width) in expected.items():
            record = self.arrays.get(name)
            if record is None:
                raise CacheFormatError(f"{where}: field 'arrays.{name}' is missing")
            shape = (rows[array_spec(name).rows],) + ((width,) if width is not None else ())
            if record.dtype != dtype:
                raise CacheFormatError(
                    f"{where}: field 'arrays.{name}.dtype': expected {dtype} (from the manifest), got {record.dtype}"
                )
            if tuple(record.shape) != shape:
                raise CacheFormatError(
                    f"{where}: field 'arrays.{name}.shape': expected {list(shape)}, got {list(record.shape)}"
                )
