"""The cache contract shared by `pipeline` (writes caches) and `student` (reads them).

Pure Python: imports neither torch nor transformers nor zarr. See DESIGN.md for the
reasons behind the layout.
"""

from schemas.errors import CacheFormatError, CacheMismatchError
from schemas.layout import (
    COMMIT_SUFFIX,
    COMMITS_DIR,
    EMBED_FILE,
    EMBED_FORMAT,
    EMBED_WEIGHT,
    HEAD_BIAS,
    HEAD_FILE,
    HEAD_FORMAT,
    HEAD_SHA256_FILE,
    HEAD_WEIGHT,
    IMAGES_DIR,
    LOCKS_DIR,
    MANIFEST_FILE,
    PATH_REF,
    RESPONSES_DIR,
    SHA256_REF,
    SHARDS_DIR,
    TEACHER_DIR,
    TEACHER_HF_DIR,
    image_file,
    parse_image_ref,
    path_ref,
    sha256_ref,
)
from schemas.manifest import (
    CODEC_NAMES,
    FORMAT_NAME,
    FORMAT_VERSION,
    MIN_COSINE,
    as_format_version,
    require_layers,
    CacheManifest,
    DataInfo,
    FeatureEncoding,
    PositionsInfo,
    ResponsesInfo,
    StorageInfo,
    TeacherInfo,
    TopKInfo,
    read_json,
    read_manifest,
)
from schemas.shard import (
    ARRAY_SPECS,
    ARRAYS_DIR,
    LAYER_ARRAY_SPECS,
    array_layer,
    array_spec,
    array_specs,
    layer_array_names,
    INDEX_FILE,
    REJECTS_FILE,
    SAMPLES_FILE,
    TMP_PREFIX,
    ArrayRecord,
    ShardIndex,
    expected_arrays,
)
from schemas.tables import REJECT_COLUMNS, SAMPLE_COLUMNS

__all__ = [
    "COMMIT_SUFFIX", "COMMITS_DIR", "HEAD_SHA256_FILE",
    "ARRAY_SPECS", "ARRAYS_DIR", "CODEC_NAMES", "EMBED_FILE", "EMBED_FORMAT", "EMBED_WEIGHT", "FORMAT_NAME",
    "FORMAT_VERSION", "HEAD_BIAS", "HEAD_FILE", "HEAD_FORMAT",
    "HEAD_WEIGHT", "IMAGES_DIR", "INDEX_FILE", "LOCKS_DIR", "MANIFEST_FILE", "MIN_COSINE", "PATH_REF", "RESPONSES_DIR",
    "REJECTS_FILE", "REJECT_COLUMNS", "SAMPLES_FILE", "SAMPLE_COLUMNS", "SHA256_REF", "SHARDS_DIR", "TEACHER_DIR",
    "TEACHER_HF_DIR", "TMP_PREFIX", "image_file", "parse_image_ref", "path_ref", "sha256_ref",
    "ArrayRecord", "CacheFormatError", "CacheManifest", "CacheMismatchError", "DataInfo", "FeatureEncoding",
    "PositionsInfo", "ResponsesInfo", "ShardIndex", "StorageInfo", "TeacherInfo", "TopKInfo", "expected_arrays",
    "read_json", "read_manifest", "LAYER_ARRAY_SPECS", "array_layer", "array_spec", "array_specs", "as_format_version",
    "layer_array_names", "require_layers",
]
