"""`pipeline verify` catches corruption and names the shard; `pipeline inspect` reports sizes."""

import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main as pipeline_cli
from pipeline.store.verify import verify_cache
from schemas import FORMAT_VERSION


def run(*args):
    return CliRunner().invoke(pipeline_cli, [str(a) for a in args])


def flip_byte(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x40
    path.write_bytes(bytes(data))


def test_clean_cache_verifies(small_cache):
    root, samples = small_cache
    result = run("verify", root, "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"{len(samples)} samples verified" in result.output


@pytest.mark.parametrize("array", ["features", "topk_logprobs", "target_ids"])
def test_flipped_byte_in_chunk_file_names_the_shard(small_cache, array):
    root, _ = small_cache
    shard = sorted((root / "shards").iterdir())[2]
    chunk = next(p for p in (shard / "arrays" / array).rglob("*") if p.is_file() and p.name != "zarr.json")
    flip_byte(chunk, 0.3)
    result = run("verify", root, "--no-progress")
    assert result.exit_code == 1
    assert f"{shard.name}: " in result.output and f"arrays/{array}/" in result.output
    others = [p.name for p in (root / "shards").iterdir() if p.name != shard.name]
    assert not any(f"{name}:" in result.output for name in others)


def test_array_read_fails_loudly_on_corruption_even_without_verify(small_cache):
    from pipeline.store.reader import CacheReader

    root, _ = small_cache
    reader = CacheReader(root)
    sid = reader.sample_ids[0]
    shard = reader.root / "shards" / reader.get(sid).shard
    chunk = next(p for p in (shard / "arrays" / "features").rglob("*") if p.is_file() and p.name != "zarr.json")
    flip_byte(chunk, 0.1)  # inside the first inner chunk, which holds row 0
    with pytest.raises(Exception, match="checksum"):
        CacheReader(root).get(sid)


def test_corrupt_parquet_and_index_are_reported(small_cache):
    root, _ = small_cache
    shards = sorted((root / "shards").iterdir())
    flip_byte(shards[0] / "samples.parquet")
    (shards[1] / "index.json").write_text("{not json")
    report = verify_cache(root)
    assert not report.ok
    assert any("samples.parquet" in p for p in report.problems[shards[0].name])
    assert any("not valid JSON" in p for p in report.problems[shards[1].name])
    assert set(report.problems) == {shards[0].name, shards[1].name}


def test_missing_teacher_head_is_a_problem(small_cache):
    root, _ = small_cache
    (root / "teacher" / "head.safetensors").unlink()
    result = run("verify", root, "--no-progress")
    assert result.exit_code == 1 and "teacher head is missing" in result.output


def test_newer_manifest_version_gives_clear_error(small_cache):
    root, _ = small_cache
    data = json.loads((root / "manifest.json").read_text())
    data["format_version"] = FORMAT_VERSION + 1
    (root / "manifest.json").write_text(json.dumps(data))
    for command in ("verify", "inspect"):
        result = run(command, root)
        assert result.exit_code == 2
        assert (f"manifest.json: cache format version {FORMAT_VERSION + 1} is newer than this tool supports "
                f"({FORMAT_VERSION})") in result.output
        assert "Traceback" not in result.output


def test_inspect_reports_counts_and_bytes_per_token(small_cache):
    root, samples = small_cache
    result = run("inspect", root)
    assert result.exit_code == 0, result.output
    assert f"{len(samples)} stored, 0 rejected" in result.output
    for array in ("features", "topk_ids", "topk_logprobs", "question_features"):
        assert array in result.output
    summary = json.loads(run("inspect", root, "--json").output)
    tokens = sum(len(s.target_ids) for s in samples)
    assert summary["tokens"] == tokens
    features = summary["arrays"]["features"]
    assert features["raw_bytes"] == tokens * 64 * 2
    # counted here from the files on disk: every committed shard's features folder, chunks and metadata
    on_disk = sum(f.stat().st_size for shard in (root / "shards").iterdir() if not shard.name.startswith(".")
                  for f in (shard / "arrays" / "features").rglob("*") if f.is_file())
    assert on_disk > 0.5 * features["raw_bytes"]  # random synthetic features hardly compress
    assert features["stored_bytes"] == on_disk
    assert features["stored_bytes_per_token"] == pytest.approx(on_disk / tokens)


def test_inspect_names_the_head_bytes_and_counts_in_the_singular(tmp_path, teacher):
    from tests.conftest import write_cache
    from tests.synthetic import synthetic_manifest

    root = tmp_path / "cache"
    write_cache(root, teacher, ["a", "b"], manifest=synthetic_manifest(shard_target_tokens=10_000))
    result = run("inspect", root)
    assert result.exit_code == 0, result.output
    assert "in 1 shard from 1 writer" in result.output and "1 shards" not in result.output
    head_bytes = (root / "teacher" / "head.safetensors").stat().st_size
    summary = json.loads(run("inspect", root, "--json").output)
    assert summary["head_bytes"] == head_bytes and 0 < summary["shard_bytes"] < summary["total_bytes"]
    head_line = next(line for line in result.output.splitlines() if line.strip().startswith("head"))
    assert "teacher head" in head_line and "vocab 500 x d 64" in head_line


@pytest.mark.parametrize(
    "encoding, teacher_dtype, words",
    [
        ("bf16", "bfloat16", ["bit for bit", "bit-exact to the bfloat16 teacher"]),
        ("bf16", "float32", ["bit for bit", "relative to the float32 teacher it rounds (cosine >= 0.9999)"]),
        ("int8", "float32", ["int8: lossy relative to the float32 teacher"]),
    ],
)
def test_inspect_says_what_the_features_are_exact_to(encoding, teacher_dtype, words):
    import torch

    from pipeline.dump_config import feature_encoding
    from pipeline.store.inspect_cache import feature_precision
    from schemas.dataclass_io import to_dict

    text = feature_precision(to_dict(feature_encoding(encoding, getattr(torch, teacher_dtype))))
    for w in words:
        assert w in text, text
    assert ("lossy" in text) == (encoding != "bf16")


def test_inspect_rejects_lists_ids_and_reasons(tmp_path, teacher):
    from pipeline.store.writer import CacheWriter
    from tests.synthetic import synthetic_manifest

    root = tmp_path / "cache"
    manifest = synthetic_manifest()
    with CacheWriter(root, manifest, "w0") as writer:
        writer.add(teacher.sample("kept", 4, manifest.topk.k))
        writer.reject("too-long", "length", "5000 tokens > --max-length 4096", "data.json#3")
        writer.reject("no-image", "image", "image file not found: x.png", "data.json#7")
        writer.reject("long-2", "length", "4100 tokens > --max-length 4096", "")
    result = run("inspect", root, "--rejects")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "3 rejected samples: image 1, length 2"
    by_id = {line.split()[0]: line for line in lines[2:]}
    assert set(by_id) == {"too-long", "no-image", "long-2"}
    assert "image file not found: x.png" in by_id["no-image"] and "[data.json#7]" in by_id["no-image"]
    rows = json.loads(run("inspect", root, "--rejects", "--json").output)
    assert {r["sample_id"]: (r["stage"], r["reason"]) for r in rows} == {
        "too-long": ("length", "5000 tokens > --max-length 4096"),
        "no-image": ("image", "image file not found: x.png"),
        "long-2": ("length", "4100 tokens > --max-length 4096"),
    }
    assert "3 rejected (list them" in run("inspect", root).output


def test_inspect_rejects_of_a_clean_cache(small_cache):
    root, _ = small_cache
    result = run("inspect", root, "--rejects")
    assert result.exit_code == 0 and result.output.strip() == "no rejected samples"
    assert json.loads(run("inspect", root, "--rejects", "--json").output) == []
