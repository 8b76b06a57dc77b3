"""The commands on a cache in a bucket (moto's S3 server on 127.0.0.1): dump-teacher to s3://, verify,
inspect, student train stages 1-2-3 and student check from it; the credentials never written or printed; a
missing bucket or refused credentials stop the command before any model loads."""

import os
import uuid

import pytest
from click.testing import CliRunner

from pipeline.cli import main as pipeline_main
from pipeline.store.backend import open_storage
from student.cli import main as student_main
from tests.s3_fixtures import s3, s3_session, s3_url  # noqa: F401  (fixtures)

KEY_ID = "genrecal-key-id-for-this-test"


def _run(main, args):
    result = CliRunner().invoke(main, args)
    return result, result.output + (result.stderr if result.stderr_bytes is not None else "")


def _dump(teacher, out, *extra):
    return _run(pipeline_main, ["dump-teacher", "--model", str(teacher), "--data", "easy-vqa:train", "--out", out,
                                "--limit", "8", "--top-k", "16", "--question-features-fraction", "0.5", "--no-progress",
                                *extra])


def test_dump_verify_inspect_and_three_stages_from_a_bucket_never_write_the_secret(
        s3, s3_url, tmp_path, tiny_vlm_dir, pair_student, monkeypatch):
    secret = f"genrecal-secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)  # from the environment and from --storage-option alike
    options = ["--storage-option", f"secret_access_key={secret}", "--storage-option", f"access_key_id={KEY_ID}"]
    outputs = []
    result, out = _dump(tiny_vlm_dir("qwen2-vl-tiny", "qwen2"), s3_url, *options)
    outputs.append(out)
    assert result.exit_code == 0, out
    assert not os.path.exists("s3:") and not (tmp_path / "s3:").exists()  # nothing local named after the URL

    result, out = _run(pipeline_main, ["verify", s3_url, "--no-progress", *options])
    outputs.append(out)
    assert result.exit_code == 0 and "ok:" in out and "8 samples verified" in out, out
    result, out = _run(pipeline_main, ["inspect", s3_url, *options])
    outputs.append(out)
    assert result.exit_code == 0 and "8 stored" in out and s3_url in out, out

    run = tmp_path / "run"
    local = tmp_path / "local-cache"
    for stage, workers in ((1, "0"), (2, "1"), (3, "0")):  # stage 2 reads through a worker (forkserver start)
        result, out = _run(student_main, [
            "train", "--cache", s3_url, "--student", str(pair_student.path), "--out", str(run), "--stage", str(stage),
            "--steps", "2", "--batch-size", "4", "--num-workers", workers, "--no-progress", "--cache-dir-local",
            str(local), *options])
        outputs.append(out)
        assert result.exit_code == 0, out
        assert (run / f"stage{stage}").is_dir()
    assert any(p.name == "head.safetensors" for p in local.rglob("*"))  # the head came down once, by its sha256
    result, out = _run(student_main, ["check", "--student", str(pair_student.path), "--cache", s3_url, "--stage", "1",
                                      "--batch-size", "2", *options])
    outputs.append(out)
    assert result.exit_code == 0, out

    storage = open_storage(s3_url)
    written = {rel: storage.read_bytes(rel) for rel in storage.list_files("")}
    assert "manifest.json" in written and any(r.startswith("commits/") for r in written)
    local_files = [p for p in tmp_path.rglob("*") if p.is_file()]
    for needle in (secret, KEY_ID):
        assert not any(needle.encode() in data for data in written.values()), needle
        assert not any(needle.encode() in p.read_bytes() for p in local_files), needle
        assert not any(needle in out for out in outputs), needle


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the storage was checked")

    monkeypatch.setattr("pipeline.dump.load_teacher", refuse)
    monkeypatch.setattr("student.train.load_vlm", refuse)


def test_a_missing_bucket_stops_dump_train_and_verify_before_any_model_loads(s3, tmp_path, no_model_loads):
    missing = f"s3://genrecal-missing-{uuid.uuid4().hex[:8]}/cache"
    result, out = _dump("unused-teacher", missing)
    assert result.exit_code == 2 and "bucket does not exist" in out and missing in out, out
    assert "Traceback" not in out
    result, out = _run(student_main, ["train", "--cache", missing, "--student", "unused-student", "--out",
                                      str(tmp_path / "run"), "--stage", "1", "--no-progress"])
    assert result.exit_code == 2 and "bucket does not exist" in out, out
    result, out = _run(pipeline_main, ["verify", missing, "--no-progress"])
    assert result.exit_code == 2 and "bucket does not exist" in out, out
    result, out = _run(student_main, ["check", "--student", "unused-student", "--cache", missing])
    assert result.exit_code == 2 and "bucket does not exist" in out, out
    unreachable = ["--storage-option", "endpoint=http://127.0.0.1:9"]  # --storage-option reaches the client
    result, out = _run(pipeline_main, ["inspect", missing, *unreachable])
    assert result.exit_code == 2 and "endpoint cannot be reached" in out, out
    result, out = _run(pipeline_main, ["inspect", missing, "--storage-option", "no-value"])
    assert result.exit_code == 2 and "--storage-option takes KEY=VALUE" in out, out


def test_refused_credentials_stop_the_dump_before_the_teacher_loads(s3, s3_url, no_model_loads):
    from moto.core.authorization import enable_iam_authentication

    with enable_iam_authentication():  # moto checks signatures against its IAM users now: ours is unknown
        result, out = _dump("unused-teacher", s3_url)
    assert result.exit_code == 2 and "access refused: check the credentials" in out, out
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in out
