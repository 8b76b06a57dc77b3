"""How a stage runs: bf16 autocast, gradient checkpointing, FSDP2 under torchrun, the question-reliance
diagnostic, TensorBoard, and the student-vocabulary check."""

import json
import os
import subprocess
import sys

import collections
import contextlib

import pytest
import torch

from pipeline.vlm.models import load_vlm
from student.train import train_stage
from tests.test_student_train import config, weights

TERMS_2 = ("ce", "kl", "reg_ce", "reg_kl", "student_ce", "total")


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, pair_cache, pair_student):
    """A finished stage 1 that the stage-2 runs below start from."""
    out = tmp_path_factory.mktemp("stage1-run")
    train_stage(config(pair_cache, pair_student, out, 1, steps=2, num_workers=0), progress=False)
    return out


def _stage2(tmp_path, stage1, pair_cache, pair_student, name, **kw):
    import shutil

    run = tmp_path / name
    shutil.copytree(stage1 / "stage1", run / "stage1")
    return run, train_stage(config(pair_cache, pair_student, run, 2, **{"steps": 2, "num_workers": 0, **kw}),
                            progress=False)


@contextlib.contextmanager
def module_calls(outputs: bool = False):
    """Every module call while inside: [(module class name, id, output dtype or None)]. Calls are counted
    when they start (a recomputation in the backward pass may stop before a module returns); with
    `outputs`, when they return, with the dtype of their output."""
    calls = []

    def started(module, args):
        calls.append((type(module).__name__, id(module), None))

    def returned(module, args, output):
        calls.append((type(module).__name__, id(module), output.dtype if isinstance(output, torch.Tensor) else None))

    module_hooks = torch.nn.modules.module
    handle = (module_hooks.register_module_forward_hook(returned) if outputs
              else module_hooks.register_module_forward_pre_hook(started))
    try:
        yield calls
    finally:
        handle.remove()


def test_gradient_checkpointing_trains_exactly_like_without(tmp_path, stage1, pair_cache, pair_student):
    _, plain = _stage2(tmp_path, stage1, pair_cache, pair_student, "plain")
    _, ckpt = _stage2(tmp_path, stage1, pair_cache, pair_student, "ckpt", gradient_checkpointing=True)
    for a, b in zip(plain, ckpt):
        for term in TERMS_2:
            assert a[term] == pytest.approx(b[term], rel=1e-5), term


def test_gradient_checkpointing_recomputes_every_decoder_layer_in_the_backward_pass(tmp_path, stage1, pair_cache,
                                                                                      pair_student):
    """Equal losses cannot show that checkpointing is on: count the calls instead. A checkpointed layer's
    insides (its MLP) run once in the forward and once more when the backward pass recomputes them."""
    runs = {}
    for name, on in (("plain", False), ("ckpt", True)):
        with module_calls() as calls:  # attention_every=0: no gradient-free diagnostic forward in the count
            _stage2(tmp_path, stage1, pair_cache, pair_student, name, steps=1, gradient_checkpointing=on,
                    attention_every=0)
        runs[name] = sorted(collections.Counter(i for cls, i, _ in calls if cls == "LlamaMLP").values())
    layers = pair_student.model.config.get_text_config().num_hidden_layers + 2  # student body + Recalibrator blocks
    assert len(runs["plain"]) == layers and set(runs["plain"]) == {1}  # one micro-batch, one forward each
    assert runs["ckpt"] == [2] * layers


def test_bf16_autocast_stays_close_to_fp32_and_logs_the_question_reliance(tmp_path, stage1, pair_cache, pair_student):
    _, fp32 = _stage2(tmp_path, stage1, pair_cache, pair_student, "fp32", attention_every=1)
    with module_calls(outputs=True) as calls:
        _, bf16 = _stage2(tmp_path, stage1, pair_cache, pair_student, "bf16", precision="bf16", attention_every=1)
    # the matmuls of the student and the Recalibrator ran in bf16 (the head losses switch autocast off)
    linear = collections.Counter(dtype for cls, _, dtype in calls if cls == "Linear")
    assert linear[torch.bfloat16] > 0, linear
    # the first step sees the same weights: only bf16 rounding in the student and Recalibrator forward separates them
    for term in TERMS_2:
        assert bf16[0][term] == pytest.approx(fp32[0][term], rel=0.05), term
    assert any(bf16[0][term] != fp32[0][term] for term in TERMS_2)  # ... and it does separate them
    for record in fp32 + bf16:
        assert torch.isfinite(torch.tensor([record["question_reliance"], record["question_reliance_first"]])).all()


def test_question_reliance_is_logged_every_n_steps(tmp_path, pair_cache, pair_student):
    metrics = train_stage(config(pair_cache, pair_student, tmp_path / "run", 1, steps=3, attention_every=2,
                                 num_workers=0), progress=False)
    assert ["question_reliance" in m for m in metrics] == [True, False, True]


def test_student_tokenizer_larger_than_its_embedding_is_refused(tmp_path, pair_cache, pair_student):
    import shutil

    folder = tmp_path / "student"
    shutil.copytree(pair_student.path, folder)
    vlm = load_vlm(folder)
    vlm.tokenizer.add_tokens([f"<extra_{i}>" for i in range(200)])
    vlm.tokenizer.save_pretrained(folder)
    cfg = config(pair_cache, pair_student, tmp_path / "run", 1)
    cfg = type(cfg)(**{**cfg.to_dict(), "loss": cfg.loss, "student": str(folder)})
    with pytest.raises(ValueError, match="tokenizer has .* tokens but its output layer only"):
        train_stage(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_tensorboard_writes_events_or_says_what_to_install(tmp_path, pair_cache, pair_student, monkeypatch):
    cfg = config(pair_cache, pair_student, tmp_path / "run", 1, steps=1, tensorboard=True, num_workers=0)
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="pip install tensorboard"):
            train_stage(cfg, progress=False)
        return
    train_stage(cfg, progress=False)
    assert list((tmp_path / "run" / "tensorboard" / "stage1").glob("events.out.tfevents.*"))


def test_two_process_fsdp_matches_one_process_and_saves_a_stock_folder(tmp_path, stage1, pair_cache, pair_student):
    from tests.conftest import REPO

    import shutil

    shutil.copytree(stage1 / "stage1", tmp_path / "fsdp" / "stage1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "student.cli", "train", "--cache", str(pair_cache), "--student", str(pair_student.path),
           "--out", str(tmp_path / "fsdp"), "--stage", "2", "--steps", "2", "--batch-size", "2", "--lr", "1e-3",
           "--lr-end", "1e-4", "--num-workers", "0", "--no-progress", "--fsdp"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=REPO, env=env, check=True, timeout=600)
    run, single = _stage2(tmp_path, stage1, pair_cache, pair_student, "one", batch_size=2, grad_accum=2)
    sharded = [json.loads(line) for line in (tmp_path / "fsdp" / "stage2" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(single, sharded, strict=True):
        for term in TERMS_2:
            assert a[term] == pytest.approx(b[term], rel=1e-4), (term, a[term], b[term])
    one, fsdp = weights(run / "stage2"), weights(tmp_path / "fsdp" / "stage2")
    assert one.keys() == fsdp.keys()
    for name in one:
        torch.testing.assert_close(fsdp[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    load_vlm(tmp_path / "fsdp" / "stage2")  # the gathered checkpoint is a stock folder


def test_nothing_to_train_on_is_a_clear_error(tmp_path, pair_cache, pair_student):
    # e.g. a cache whose samples were all rejected: the loop must not wait for batches that never come
    with pytest.raises(ValueError, match="no samples to train on"):
        train_stage(config(pair_cache, pair_student, tmp_path / "run", 1, sample_ids=()), progress=False)


def test_the_clip_logs_each_parts_norm_and_clips_like_torch():
    """One global clip over the student and what trains beside it (torch's clip_grad_norm_ as the reference),
    the norms before clipping logged per part."""
    from student.config import TrainConfig
    from student.loop import _Run

    torch.manual_seed(0)
    student, beside = torch.nn.Linear(4, 3), torch.nn.Linear(3, 5)
    params = list(student.parameters()) + list(beside.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * (50.0 if p in set(beside.parameters()) else 1.0)
    reference = [p.grad.clone() for p in params]
    copies = [torch.nn.Parameter(torch.zeros_like(g)) for g in reference]
    for c, g in zip(copies, reference):
        c.grad = g.clone()
    expected = torch.nn.utils.clip_grad_norm_(copies, 1.0)
    s_norm = torch.cat([g.flatten() for g in reference[:2]]).norm()
    b_norm = torch.cat([g.flatten() for g in reference[2:]]).norm()
    cfg = TrainConfig(cache=".", student="s", out="o", stage=2, max_grad_norm=1.0)
    norms = _Run(cfg, student, None, None, False, params, params)._clip()
    assert norms["grad_norm"] == pytest.approx(float(expected), rel=1e-6)
    assert norms["grad_norm_student"] == pytest.approx(float(s_norm), rel=1e-6)
    assert norms["grad_norm_beside"] == pytest.approx(float(b_norm), rel=1e-6)
    total = float(torch.cat([p.grad.flatten() for p in params]).norm())
    assert total == pytest.approx(1.0, rel=1e-4)  # clipped to max_grad_norm
    for p, c in zip(params, copies):  # one common scale for both parts, as torch's
        torch.testing.assert_close(p.grad, c.grad, rtol=1e-5, atol=1e-7)
