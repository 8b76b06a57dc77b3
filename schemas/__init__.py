"""The cache contract shared by `pipeline` (writes caches) and `student` (reads them).

Pure Python: imports neither torch nor transformers nor zarr. See DESIGN.md for the
reasons behind the layout.
"""

from schemas.errors import CacheFormatError, CacheMismatchError
from schemas.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    HEAD_FILE,
    MANIFEST_FILE,
    MIN_COSINE,
    SHARDS_DIR,
    TEACHER_DIR,
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
    "ARRAY_SPECS", "ARRAYS_DIR", "FORMAT_NAME", "FORMAT_VERSION", "HEAD_FILE", "INDEX_FILE", "MANIFEST_FILE", "MIN_COSINE",
    "REJECTS_FILE", "REJECT_COLUMNS", "SAMPLES_FILE", "SAMPLE_COLUMNS", "SHARDS_DIR", "TEACHER_DIR", "TMP_PREFIX",
    "ArrayRecord", "CacheFormatError", "CacheManifest", "CacheMismatchError", "DataInfo", "FeatureEncoding",
    "PositionsInfo", "ResponsesInfo", "ShardIndex", "StorageInfo", "TeacherInfo", "TopKInfo", "expected_arrays",
    "read_json", "read_manifest",
]
