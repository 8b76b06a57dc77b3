"""The cache contract: dataclass round trips, clear errors, and the checked-in JSON Schema."""

import json

import jsonschema
import pytest

from schemas import CacheFormatError, CacheManifest, CacheMismatchError, ShardIndex
from schemas.generate import SCHEMA_FILES, HERE, render
from tests.synthetic import synthetic_manifest


def test_manifest_round_trip_through_json():
    manifest = synthetic_manifest(k=4, encoding="int8", question_features_fraction=0.25)
    again = CacheManifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again == manifest


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d["teacher"].pop("hidden_size"), "missing field 'teacher.hidden_size'"),
        (lambda d: d["teacher"].update(hidden_size="64"), "field 'teacher.hidden_size': expected int"),
        (lambda d: d["topk"].update(logprob_dtype="float64"), "field 'topk.logprob_dtype': expected one of"),
        (lambda d: d["features"].update(encoding="fp8_e4m3"), "lossy; lossless must be false"),
        (lambda d: d.update(surprise=1), "unknown field(s) surprise"),
        (lambda d: d["teacher"].update(end_of_turn_token_ids=[1, "2"]), "teacher.end_of_turn_token_ids[1]"),
    ],
)
def test_manifest_errors_name_file_and_field(mutate, message):
    data = synthetic_manifest().to_dict()
    mutate(data)
    with pytest.raises(CacheFormatError) as err:
        CacheManifest.from_dict(data, "cache/manifest.json")
    assert "cache/manifest.json" in str(err.value)
    assert message in str(err.value)


def test_newer_format_version_is_refused_before_other_fields():
    data = {"format": "genrecal-teacher-cache", "format_version": 99, "whatever": True}
    with pytest.raises(CacheFormatError, match="version 99 is newer than this tool supports"):
        CacheManifest.from_dict(data, "m.json")


def test_other_format_is_refused():
    data = synthetic_manifest().to_dict() | {"format": "something-else"}
    with pytest.raises(CacheFormatError, match="format is 'something-else'"):
        CacheManifest.from_dict(data, "m.json")


def test_compatibility_check_lists_every_difference():
    a = synthetic_manifest(hidden_size=64, k=8)
    b = synthetic_manifest(hidden_size=32, k=4)
    with pytest.raises(CacheMismatchError) as err:
        a.check_compatible(b, "x/manifest.json")
    assert "teacher.hidden_size" in str(err.value) and "topk.k" in str(err.value)
    a.check_compatible(synthetic_manifest(hidden_size=64, k=8), "x/manifest.json")  # equal: no error


@pytest.mark.parametrize("filename", sorted(SCHEMA_FILES))
def test_checked_in_json_schema_is_current(filename):
    cls, title = SCHEMA_FILES[filename]
    assert (HERE / filename).read_text() == render(cls, title), "run: python -m schemas.generate"


def test_json_schema_accepts_real_manifest_and_rejects_bad_one():
    schema = json.loads((HERE / "manifest.schema.json").read_text())
    data = synthetic_manifest().to_dict()
    jsonschema.validate(data, schema)
    data["topk"]["k"] = "8"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, schema)


def test_field_docs_reach_the_schema():
    schema = json.loads((HERE / "manifest.schema.json").read_text())
    assert "padding" in schema["properties"]["teacher"]["properties"]["vocab_size"]["description"]


def test_shard_index_checks_shapes_against_manifest(small_cache):
    root, _ = small_cache
    manifest = synthetic_manifest()
    index_path = next((root / "shards").iterdir()) / "index.json"
    data = json.loads(index_path.read_text())
    jsonschema.validate(data, json.loads((HERE / "shard-index.schema.json").read_text()))
    data["arrays"]["features"]["shape"][1] = 65
    index = ShardIndex.from_dict(data, str(index_path))
    with pytest.raises(CacheFormatError, match=r"arrays.features.shape': expected \[\d+, 64\]"):
        index.check_against(manifest, str(index_path))
