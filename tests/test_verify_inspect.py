"""`pipeline verify` catches corruption and names the shard; `pipeline inspect` reports sizes."""

import json

import pytest
from click.testing import CliRunner

from pipeline.cli import main as pipeline_cli
from pipeline.store.verify import verify_cache


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
    data["format_version"] = 2
    (root / "manifest.json").write_text(json.dumps(data))
    for command in ("verify", "inspect"):
        result = run(command, root)
        assert result.exit_code == 2
        assert "manifest.json: cache format version 2 is newer than this tool supports (1)" in result.output
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
    assert features["stored_bytes_per_token"] == pytest.approx(features["stored_bytes"] / tokens)
