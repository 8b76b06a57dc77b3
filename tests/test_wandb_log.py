"""`student train --wandb` with WANDB_MODE=offline (no network): the offline run folder holds every metric that
metrics.jsonl holds, question reliance included, at the same steps, and the run's settings."""

import json
import struct
import time

import pytest

from pipeline.run_metrics import read_metrics
from student.config import TrainConfig
from student.train import train_stage

wandb = pytest.importorskip("wandb")
BLOCK, FULL, LAST = 32768, 1, 4  # wandb's run file: a LevelDB-style log of protobuf records in 32 KiB blocks


def wandb_records(path):
    """The protobuf `Record`s of an offline run file (run-<id>.wandb): a 7-byte file header, then chunks of
    [crc32c 4, length 2, type 1] + payload, a record split over blocks as FIRST, MIDDLE..., LAST."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, payload = path.read_bytes(), 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # too little left in the block for a header: padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # the end, or a record still being written
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(payload)
            yield record
            payload = b""


def wait_until_finished(run_file, seconds: float = 60.0) -> None:
    """W&B's service process writes the run file on its own; its last records can land after finish() returns."""
    deadline = time.monotonic() + seconds
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)):
        assert time.monotonic() < deadline, f"{run_file}: no exit record after {seconds:.0f} s"
        time.sleep(0.2)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B writes a name in one field or the other


def logged_history(run_file) -> dict[int, dict]:
    """step -> the metrics W&B recorded at it (its own _runtime, _timestamp left out)."""
    out = {}
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "history":
            row = {_key(item): json.loads(item.value_json) for item in record.history.item}
            step = row.get("_step", record.history.step.num)  # in the row, or only in the record's step field
            out[step] = {k: v for k, v in row.items() if not k.startswith("_")}
    return out


def logged_config(run_file) -> dict:
    for record in wandb_records(run_file):
        if record.WhichOneof("record_type") == "run":
            return {_key(item): json.loads(item.value_json) for item in record.run.config.update}
    return {}


def test_every_metric_reaches_an_offline_wandb_run(tmp_path, pair_cache, pair_student, monkeypatch):
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    cfg = TrainConfig(cache=str(pair_cache), student=str(pair_student.path), out=str(out), stage=1, steps=3,
                      batch_size=4, num_workers=0, attention_every=1, wandb=True)
    train_stage(cfg, progress=False)
    jsonl = read_metrics(out / "stage1")
    (run_file,) = (out / "wandb" / "stage1").glob("wandb/offline-run-*/run-*.wandb")
    wait_until_finished(run_file)
    history = logged_history(run_file)
    assert sorted(history) == [row["step"] for row in jsonl] == [1, 2, 3]
    for row in jsonl:
        expected = {k: v for k, v in row.items() if k != "step"}
        assert "question_reliance" in expected and "grad_norm" in expected
        assert history[row["step"]].keys() == expected.keys()
        for key, value in expected.items():
            assert history[row["step"]][key] == pytest.approx(value), key
    config = logged_config(run_file)
    assert config["stage"] == 1 and config["loss"]["kl_weight"] == 1.0 and config["wandb"] is True
    assert (out / "wandb" / "stage1" / "run_id").read_text().strip() in run_file.name
