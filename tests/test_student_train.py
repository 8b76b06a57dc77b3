"""The three stages end to end on a heterogeneous pair; what trains where; resume equals uninterrupted."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.vlm.models import load_vlm
from student.config import TrainConfig
from student.train import train_stage
from student.trainable import is_vision_encoder


def config(cache, student, out, stage, **kw):
    # in-process loading unless a test asks for workers: starting worker processes costs more than these tiny steps
    return TrainConfig(cache=str(cache), student=str(student.path), out=str(out), stage=stage,
                       **{"steps": 3, "batch_size": 4, "lr": 1e-3, "lr_end": 1e-4, "num_workers": 0, **kw})


def weights(folder):
    (path,) = folder.glob("model*.safetensors")
    return load_file(str(path))


def test_three_stages_end_to_end(tmp_path, pair_cache, pair_student, monkeypatch):
    import student.checkpoint

    saved = {}  # the stage-3 model as it was in memory when its folder was written
    write = student.checkpoint._write_checkpoint

    def capture(cfg, vlm, *args):
        if cfg.stage == 3:
            saved["model"], saved["state"] = vlm.model, {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}
        write(cfg, vlm, *args)

    monkeypatch.setattr(student.checkpoint, "_write_checkpoint", capture)
    original = weights(__import__("pathlib").Path(pair_student.path))
    for stage in (1, 2, 3):
        metrics = train_stage(config(pair_cache, pair_student, tmp_path, stage), progress=False)
        assert len(metrics) == 3 and all(torch.isfinite(torch.tensor(m["total"])) for m in metrics)
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(tmp_path / "stage3").eval()
    reloaded = model.state_dict()  # a stock load of the stage-3 folder has every tensor the trained model had
    for name, tensor in saved["state"].items():
        torch.testing.assert_close(reloaded[name], tensor, rtol=0, atol=0, msg=name)
    stage1, stage2, stage3 = (weights(tmp_path / f"stage{n}") for n in (1, 2, 3))
    assert all(torch.equal(stage1[k], original[k]) for k in original)  # stage 1: Recalibrator only
    assert (tmp_path / "stage1" / "recalibrator" / "model.safetensors").exists()
    vision = [k for k in original if is_vision_encoder(k)]
    assert vision and all(torch.equal(stage2[k], original[k]) for k in vision)  # vision encoder frozen
    assert any(not torch.equal(stage2[k], original[k]) for k in original if not is_vision_encoder(k))
    assert any(not torch.equal(stage3[k], stage2[k]) for k in stage2 if not is_vision_encoder(k))  # stage 3 trained
    assert all(torch.equal(stage3[k], stage2[k]) for k in vision)
    assert not (tmp_path / "stage3" / "recalibrator").exists()
    lines = (tmp_path / "stage2" / "metrics.jsonl").read_text().splitlines()
    record = json.loads(lines[-1])
    assert {"ce", "kl", "student_ce", "lr", "tokens_per_s", "loader_wait_share", "peak_memory_mb"} <= set(record)
    # the stage-3 folder is a stock checkpoint holding what was in memory: the same logits; it generates
    processor = load_vlm(tmp_path / "stage3").processor
    inputs = processor(text=["[INST] hello [/INST]"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, saved["model"].eval()(**inputs).logits, rtol=1e-5, atol=1e-6)
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3 or out[0, -1] == processor.tokenizer.eos_token_id


def test_resume_continues_with_the_same_losses(tmp_path, pair_cache, pair_student):
    # the uninterrupted run loads with 2 worker processes, the split one in-process: same batches either way
    whole = train_stage(config(pair_cache, pair_student, tmp_path / "whole", 1, steps=4, num_workers=2), progress=False)
    first = train_stage(config(pair_cache, pair_student, tmp_path / "split", 1, steps=4), progress=False, stop_after=2)
    rest = train_stage(config(pair_cache, pair_student, tmp_path / "split", 1, steps=4), resume=True, progress=False)
    assert [m["step"] for m in first + rest] == [1, 2, 3, 4]
    for a, b in zip(whole, first + rest):
        assert a["total"] == pytest.approx(b["total"], rel=1e-5, abs=1e-6)


def test_stage_2_without_stage_1_is_refused(tmp_path, pair_cache, pair_student):
    with pytest.raises(FileNotFoundError, match="run --stage 1 first"):
        train_stage(config(pair_cache, pair_student, tmp_path, 2), progress=False)


def test_missing_teacher_head_fails_before_training(tmp_path, pair_cache, pair_student):
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(pair_cache, cache)
    (cache / "teacher" / "head.safetensors").unlink()
    with pytest.raises(Exception, match="teacher head is missing"):
        train_stage(config(cache, pair_student, tmp_path / "run", 1), progress=False)
    assert not (tmp_path / "run").exists()


def test_internvl_teacher_to_qwen2_vl_student_with_other_vocabulary(tmp_path, tiny_vlm_dir):
    from pipeline.dump import dump_teacher
    from pipeline.dump_config import DumpConfig
    from pipeline.store.reader import CacheReader

    cache = tmp_path / "cache"
    dump_teacher(DumpConfig(model=str(tiny_vlm_dir("internvl-tiny", "qwen2")), data="easy-vqa:train", out=str(cache),
                            limit=6, top_k=8, question_features_fraction=0.5), progress=False)
    student = load_vlm(tiny_vlm_dir("qwen2-vl-tiny", "tiny-bpe"))  # M-RoPE student, 512-token vocabulary
    assert CacheReader(cache).manifest.teacher.vocab_size > 150_000 > student.model.config.get_text_config().vocab_size
    for stage in (1, 2, 3):
        metrics = train_stage(config(cache, student, tmp_path / "run", stage, steps=2, batch_size=3), progress=False)
        assert len(metrics) == 2 and all(torch.isfinite(torch.tensor(m["total"])) for m in metrics)
    assert load_vlm(tmp_path / "run" / "stage3").family == "qwen2_vl"


def test_resume_against_another_cache_or_a_mismatched_head_fails_before_training(tmp_path, pair_cache, pair_student):
    import shutil

    from safetensors.torch import save_file

    train_stage(config(pair_cache, pair_student, tmp_path / "run", 1, steps=3), progress=False, stop_after=1)
    other = tmp_path / "other"
    shutil.copytree(pair_cache, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["teacher"]["model"] = "another-teacher"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="not the cache this run started with"):
        train_stage(config(other, pair_student, tmp_path / "run", 1, steps=3), resume=True, progress=False)
    head = load_file(str(pair_cache / "teacher" / "head.safetensors"))["weight"]
    save_file({"weight": head[:1000].contiguous()}, str(other / "teacher" / "head.safetensors"))
    with pytest.raises(Exception, match=r"head weight has shape \(1000, 128\), manifest says \(\d+, 128\)"):
        train_stage(config(other, pair_student, tmp_path / "fresh", 1), progress=False)
    assert not (tmp_path / "fresh").exists()


def test_two_process_torchrun_matches_one_process_on_the_same_global_batch(tmp_path, pair_cache, pair_student):
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    common = ["--cache", str(pair_cache), "--student", str(pair_student.path), "--stage", "1", "--steps", "3",
              "--batch-size", "2", "--lr", "1e-3", "--lr-end", "1e-4", "--num-workers", "0", "--no-progress"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "student.cli", "train", "--out", str(tmp_path / "ddp"), "--grad-accum", "1", *common]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=600)
    single = train_stage(config(pair_cache, pair_student, tmp_path / "one", 1, steps=3, batch_size=2, grad_accum=2),
                         progress=False)
    ddp = [json.loads(line) for line in (tmp_path / "ddp" / "stage1" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in ddp] == [1, 2, 3]
    for a, b in zip(single, ddp):
        for term in ("ce", "kl", "reg_ce", "reg_kl", "total"):
            if term in a:
                assert a[term] == pytest.approx(b[term], rel=1e-4), (term, a[term], b[term])
