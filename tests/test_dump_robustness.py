"""Bad input never stops a dump; a killed dump resumes to the same cache; bad options fail at once."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from click.testing import CliRunner

from pipeline.cli import main as pipeline_cli
from pipeline.dump import dump_teacher
from pipeline.dump_config import DumpConfig
from pipeline.store.reader import CacheReader
from pipeline.store.verify import verify_cache
from tests.conftest import REPO
from tests.tiny_fixtures import make_tiny_image

SYSTEM_GUARD = (
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}"
    "{{ raise_exception('system turns are not supported') }}{%- endif -%}{%- endfor -%}"
)


def llava_record(rid, image, question, answer, system=None):
    turns = [{"from": "system", "value": system}] if system else []
    turns += [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
    return {"id": rid, "image": image, "conversations": turns}


def test_every_bad_input_is_rejected_with_its_reason(tmp_path, tiny_vlm_dir):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_vlm_dir("qwen2-vl-tiny", "qwen2"), teacher)
    template = teacher / "chat_template.jinja"
    template.write_text(SYSTEM_GUARD + template.read_text())  # like templates that refuse system turns
    root = tmp_path / "images"
    root.mkdir()
    for name in ("a.png", "b.png", "c.png"):
        make_tiny_image().save(root / name)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    make_tiny_image().save(tmp_path / "secret.png")
    records = [
        llava_record("good1", "a.png", "What shape is it?", "circle"),
        llava_record("missing", "nope.png", "What shape?", "circle"),
        llava_record("corrupt", "corrupt.png", "What shape?", "circle"),
        llava_record("outside", "../secret.png", "What shape?", "circle"),
        llava_record("empty", "b.png", "What shape?", "   "),
        llava_record("long", "b.png", "Describe " * 300, "circle"),
        llava_record("template", "c.png", "What shape?", "circle", system="Be brief."),
        llava_record("good2", "b.png", "What color is it?", "red"),
        {"id": "broken", "conversations": "not a list"},
        llava_record("good3", "c.png", "Is there a circle?", "yes"),
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(records))
    cfg = DumpConfig(model=str(teacher), data=str(data), image_root=str(root), out=str(tmp_path / "c"),
                     top_k=4, max_length=200)
    stats = dump_teacher(cfg, progress=False)
    assert stats.written == 3
    reader = CacheReader(tmp_path / "c")
    assert sorted(reader.sample_ids) == ["good1", "good2", "good3"]
    rejects = {r["sample_id"]: r for r in reader.rejects_table().to_pylist()}
    expected = {
        "missing": ("image", "not found"),
        "corrupt": ("image", "corrupt.png"),
        "outside": ("image", "outside the image root"),
        "empty": ("data", "empty answer"),
        "long": ("length", "> --max-length 200"),
        "template": ("template", "system turns are not supported"),
        "broken": ("data", "conversations"),
    }
    assert set(rejects) == set(expected)
    for sid, (stage, words) in expected.items():
        assert rejects[sid]["stage"] == stage and words in rejects[sid]["reason"], rejects[sid]
        assert rejects[sid]["source"].startswith("data.json#")
    assert verify_cache(tmp_path / "c").ok


def cli_dump(model_dir, out, *extra):
    return [sys.executable, "-m", "pipeline.cli", "dump-teacher", "--model", str(model_dir), "--data",
            "easy-vqa:train", "--out", str(out), "--top-k", "8", "--max-batch-tokens", "1",
            "--shard-tokens", "24", "--no-progress", *extra]


def test_killed_dump_resumes_to_the_same_cache(tmp_path, tiny_vlm_dir):
    model_dir = tiny_vlm_dir("internvl-tiny", "tiny-bpe")
    limit = ["--limit", "150", "--question-features-fraction", "0.3"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cli_dump(model_dir, tmp_path / "killed", *limit), cwd=REPO, env=env)
    shards = tmp_path / "killed" / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and not (shards.is_dir() and [p for p in shards.iterdir() if not p.name.startswith(".")]):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(CacheReader(tmp_path / "killed"))
    assert 0 < partial < 150, partial
    subprocess.run(cli_dump(model_dir, tmp_path / "killed", *limit), cwd=REPO, env=env, check=True)
    subprocess.run(cli_dump(model_dir, tmp_path / "whole", *limit), cwd=REPO, env=env, check=True)
    killed, whole = CacheReader(tmp_path / "killed"), CacheReader(tmp_path / "whole")
    assert len(killed) == 150 and sorted(killed.sample_ids) == sorted(whole.sample_ids) and not killed.duplicates
    for sid in whole.sample_ids:
        a, b = killed.get(sid), whole.get(sid)
        for name in ("target_ids", "features", "topk_ids", "topk_logprobs", "tail_logmass", "question_features"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x is None and y is None) or np.array_equal(x, y), (sid, name)
    assert verify_cache(tmp_path / "killed").ok


def test_wrong_model_or_data_fails_at_once_with_a_clear_message(tmp_path, tiny_vlm_dir):
    runner = CliRunner()
    out = tmp_path / "c"
    result = runner.invoke(pipeline_cli, ["dump-teacher", "--model", str(tmp_path / "no-such-model"), "--data",
                                          "easy-vqa:train", "--out", str(out)])
    assert result.exit_code == 2 and "no-such-model" in result.output and "Traceback" not in result.output
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    model_dir = tiny_vlm_dir("internvl-tiny", "tiny-bpe")
    result = runner.invoke(pipeline_cli, ["dump-teacher", "--model", str(model_dir), "--data", str(bad),
                                          "--out", str(out)])
    assert result.exit_code == 2 and "bad.json" in result.output
    assert not out.exists()  # nothing was written
    result = runner.invoke(pipeline_cli, ["dump-teacher", "--model", str(model_dir), "--data", "easy-vqa:train",
                                          "--out", str(out), "--num-workers", "2", "--worker-index", "2"])
    assert result.exit_code == 2 and "--worker-index 2" in result.output
