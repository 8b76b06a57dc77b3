"""--method kd (plain logit KD for a student with the teacher's tokenizer) and the same-tokenizer check."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from student.batches import CacheStudentData
from student.config import LossConfig, TrainConfig
from student.step import kd_losses
from student.train import train_stage
from tests.vlsi_fixtures import same_cache, same_student, same_teacher_dir  # noqa: F401  (fixtures)


def _batch(cache, student):
    data = CacheStudentData(cache, student.processor, student.end_of_turn, student.pad_id)
    return data.collate([data[i] for i in range(len(data))])


def _naive_kd(logits, batch, temperature=1.0):
    """Mean over paired positions of the forward KL over k+1 buckets, in float64, from the full softmax of the
    student's logits at its answer positions: buckets = the teacher's top-k ids and one tail bucket."""
    total, positions = 0.0, 0
    for b, item in enumerate(batch.items):
        p, n_s = item.student.prompt_len, len(item.student.answer_ids)
        n = min(n_s, len(item.teacher_targets))  # paired by index, cut to the shorter answer
        differ = [t for t in range(n) if item.student.answer_ids[t] != int(item.teacher_targets[t])]
        n = differ[0] if differ else n  # and where the two sides' ids first differ
        q = torch.softmax(logits[b, p - 1 : p - 1 + n].double() / temperature, -1)
        ids = item.teacher_topk.ids[:n].long()
        t = torch.cat([item.teacher_topk.logprobs[:n].double().exp(),
                       item.teacher_topk.tail_logmass[:n].double().exp()[:, None]], 1)
        t = t / t.sum(1, keepdim=True)  # the stored buckets renormalised
        q_top = q.gather(1, ids)
        s = torch.cat([q_top, 1 - q_top.sum(1, keepdim=True)], 1)
        total = total + (t * (t.log() - s.log())).sum()
        positions += n
    return total / positions


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_term_and_gradient_equal_a_naive_reference(same_cache, same_student, temperature):
    batch = _batch(same_cache, same_student)
    first, second = batch.items[0], batch.items[1]  # answers of unequal length on each side: the cut is exercised
    first.teacher_targets, first.teacher_topk = first.teacher_targets[:-1], first.teacher_topk.slice(slice(0, -1))
    repeat = torch.cat([torch.arange(len(second.teacher_targets)), torch.tensor([len(second.teacher_targets) - 1])])
    second.teacher_targets, second.teacher_topk = second.teacher_targets[repeat], second.teacher_topk.slice(repeat)
    assert len(first.teacher_targets) < len(first.student.answer_ids) < len(second.teacher_targets)
    model = same_student.model
    head = model.get_output_embeddings().weight
    terms = kd_losses(model, batch, LossConfig(temperature=temperature))
    (grad,) = torch.autograd.grad(terms["kd"], head)
    reference = _naive_kd(model(**batch.inputs).logits, batch, temperature)
    (ref_grad,) = torch.autograd.grad(reference, head)
    torch.testing.assert_close(terms["kd"].double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-4, atol=1e-7)
    assert terms["kd"] > 0.01
    torch.testing.assert_close(terms["total"], terms["student_ce"] + terms["kd"])
    weighted = kd_losses(model, batch, LossConfig(temperature=temperature, kd_weight=0.5, student_ce_weight=0.0))
    torch.testing.assert_close(weighted["total"], 0.5 * weighted["kd"])


def test_pairing_stops_where_the_two_sides_ids_differ(same_cache, same_student):
    from student.step import paired_rows

    batch = _batch(same_cache, same_student)
    lengths = [min(len(i.student.answer_ids), len(i.teacher_targets)) for i in batch.items]
    assert paired_rows(batch, same_tokens=True) == paired_rows(batch)  # one tokenizer: every answer pairs in full
    assert kd_losses(same_student.model, batch, LossConfig())["paired_share"] == 1.0
    first = batch.items[0]
    first.teacher_targets = first.teacher_targets.clone()
    first.teacher_targets[1] = (first.teacher_targets[1] + 1) % len(same_student.tokenizer)  # the teacher's token 1 differs
    s_rows, t_rows = paired_rows(batch, same_tokens=True)
    assert len(s_rows) == len(t_rows) == 1 + sum(lengths[1:])  # the first answer keeps only its token 0
    assert s_rows[:2] == [0, len(first.student.answer_ids)] and t_rows[:2] == [0, len(first.teacher_targets)]
    assert len(paired_rows(batch)[0]) == sum(lengths)  # ULD (cross-tokenizer) pairs by index alone
    share = kd_losses(same_student.model, batch, LossConfig())["paired_share"]
    assert share == pytest.approx(len(t_rows) / sum(len(i.teacher_targets) for i in batch.items))


def test_a_kl_against_the_cached_top_k_at_another_temperature_is_refused(same_cache):
    import dataclasses

    from pipeline.store.reader import CacheReader
    from schemas.manifest import TopKInfo
    from student.train import check_topk_targets

    manifest = CacheReader(same_cache).manifest

    def cfg(method, stage, **loss):
        return TrainConfig(cache=str(same_cache), student="s", out="o", stage=stage, method=method, loss=LossConfig(**loss))

    for method, stage, loss in (("kd", 2, {}), ("genrecal", 1, {"teacher_distribution": "topk"}),
                                ("vlsi", 2, {"teacher_distribution": "topk"})):
        check_topk_targets(cfg(method, stage, **loss), manifest)  # temperature 1, as cached
        with pytest.raises(ValueError, match="top-k log-probs are at temperature 1.*use --temperature 1"):
            check_topk_targets(cfg(method, stage, temperature=2.0, **loss), manifest)
    check_topk_targets(cfg("genrecal", 2, temperature=2.0), manifest)  # exact: the head tempers both sides
    check_topk_targets(cfg("uld", 2, temperature=2.0), manifest)  # ULD uses no temperature
    check_topk_targets(cfg("vlsi", 1, temperature=2.0, teacher_distribution="topk"), manifest)  # stage 1: no KL
    no_topk = dataclasses.replace(manifest, topk=TopKInfo(k=0))
    with pytest.raises(ValueError, match="--method kd needs the cache's top-k log-probs.*--top-k 0"):
        check_topk_targets(cfg("kd", 2), no_topk)


def test_method_kd_is_a_stage_2_run_from_the_student_without_recalibrator(tmp_path, same_cache, same_student):
    cfg = TrainConfig(cache=str(same_cache), student=str(same_student.path), out=str(tmp_path / "kd"), stage=2,
                      method="kd", steps=3, batch_size=4, lr=1e-3, num_workers=0)
    metrics = train_stage(cfg, progress=False)
    assert set(metrics[0]) >= {"student_ce", "kd", "total"} and "ce" not in metrics[0] and "uld" not in metrics[0]
    assert all(torch.isfinite(torch.tensor(m["kd"])) for m in metrics)
    out = tmp_path / "kd" / "stage2"
    assert not (out / "recalibrator").exists()
    (before,) = Path(same_student.path).glob("model*.safetensors")
    (after,) = out.glob("model*.safetensors")
    old, new = load_file(str(before)), load_file(str(after))
    changed = [k for k in new if not torch.equal(old[k], new[k])]
    assert changed and not any(".visual." in f".{k}" and "merger" not in k for k in changed)  # vision frozen
    for stage in (1, 3):
        with pytest.raises(ValueError, match="stage-2 run"):
            TrainConfig(cache=str(same_cache), student="s", out="o", stage=stage, method="kd")


@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the tokenizer check")

    monkeypatch.setattr("student.train.load_vlm", refuse)


@pytest.mark.parametrize("method, stage", [("kd", 2), ("vlsi", 1)])
def test_a_cross_tokenizer_pair_is_refused_before_the_student_loads(tmp_path, pair_cache, pair_student, no_model_loads,
                                                                   method, stage):
    """pair_cache: a Qwen2-tokenizer teacher (151k tokens); pair_student: the Mistral tokenizer (32k)."""
    from click.testing import CliRunner

    from student.cli import main

    cfg = TrainConfig(cache=str(pair_cache), student=str(pair_student.path), out=str(tmp_path / "run"), stage=stage,
                      method=method, num_workers=0)
    with pytest.raises(ValueError) as err:
        train_stage(cfg, progress=False)
    text = str(err.value)
    assert f"--method {method}" in text and "--method genrecal (the default)" in text
    assert str(pair_student.path) in text and "tokens only the student has" in text and "tokens only the teacher" in text
    assert "the student has 32002 tokens, the teacher 151657" in text
    assert not (tmp_path / "run").exists()
    result = CliRunner().invoke(main, ["train", "--cache", str(pair_cache), "--student", str(pair_student.path),
                                       "--out", str(tmp_path / "cli"), "--stage", str(stage), "--method", method])
    assert result.exit_code == 2 and "--method genrecal (the default)" in result.output


def test_the_check_names_a_same_size_tokenizer_whose_token_order_differs(tiny_vlm_dir):
    from transformers import AutoTokenizer

    from student.tokenizer_match import differences

    qwen = AutoTokenizer.from_pretrained(tiny_vlm_dir("qwen2-vl-tiny", "tiny-bpe"))
    same = AutoTokenizer.from_pretrained(tiny_vlm_dir("qwen2-vl-tiny", "tiny-bpe"))
    assert differences(qwen, same) == []
    vocab = qwen.get_vocab()
    a, b = sorted(vocab, key=vocab.get)[100:102]  # swap two ids: same tokens, same size, other order
    swapped = dict(vocab, **{a: vocab[b], b: vocab[a]})
    found = differences(qwen, _VocabOnly(qwen, swapped))
    assert found == [f"token order: 2 ids hold other tokens, the first is id {vocab[a]} ({a!r} in the student, "
                     f"{b!r} in the teacher)"]


class _VocabOnly:
    """A tokenizer stand-in with another vocabulary (what `differences` reads)."""

    def __init__(self, like, vocab):
        self.vocab, self.all_special_tokens = vocab, like.all_special_tokens

    def get_vocab(self):
        return self.vocab

    def __len__(self):
        return len(self.vocab)


def test_a_same_tokenizer_pair_passes_the_check(same_cache, same_student):
    from pipeline.store.reader import CacheReader
    from student.tokenizer_match import check_same_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(same_student.path)  # the tokenizer alone, as train.py reads it before the weights
    check_same_tokenizer(tokenizer, CacheReader(same_cache).manifest, same_cache, same_student.path, "kd")


def test_a_recorded_fingerprint_that_drifted_is_settled_by_the_saved_teacher_tokenizer(tmp_path, same_cache,
                                                                                       same_student):
    """The recorded fingerprint may differ from one computed now (another transformers); the teacher tokenizer saved
    in the cache, fingerprinted now like the student's, then decides. Without it, the pair is refused."""
    import dataclasses

    from pipeline.store.reader import CacheReader
    from schemas import TEACHER_HF_DIR
    from student.tokenizer_match import check_same_tokenizer, load_tokenizer

    tokenizer = load_tokenizer(same_student.path)
    manifest = CacheReader(same_cache).manifest
    drifted = dataclasses.replace(manifest, teacher=dataclasses.replace(manifest.teacher, tokenizer_fingerprint="0" * 64))
    check_same_tokenizer(tokenizer, drifted, same_cache, same_student.path, "kd")
    bare = tmp_path / "cache-without-teacher-hf"
    shutil.copytree(same_cache, bare, ignore=lambda folder, names: [n for n in names if Path(folder, n) ==
                                                                   Path(same_cache, TEACHER_HF_DIR)])
    assert not (bare / TEACHER_HF_DIR).exists()
    with pytest.raises(ValueError, match="the teacher tokenizer is not saved in the cache"):
        check_same_tokenizer(tokenizer, drifted, bare, same_student.path, "kd")


def test_kd_leaves_the_student_heads_padding_rows_out(same_cache, same_student):
    """A head padded beyond the tokenizer (resize_token_embeddings) gives the same KD term as the unpadded one
    when cut to the tokenizer's size, as training does; without the cut the padding rows take probability mass."""
    import copy

    batch = _batch(same_cache, same_student)
    model = same_student.model
    size = len(same_student.tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == size  # the fixture's head has no padding of its own
    padded = copy.deepcopy(model)
    padded.resize_token_embeddings(size + 16)
    with torch.no_grad():
        padded.get_output_embeddings().weight[size:] = 3 * model.get_output_embeddings().weight[:16]
    reference = kd_losses(model, batch, LossConfig())["kd"]
    torch.testing.assert_close(kd_losses(padded, batch, LossConfig(), vocab=size)["kd"], reference, rtol=1e-5, atol=1e-6)
    assert abs(float(kd_losses(padded, batch, LossConfig())["kd"]) - float(reference)) > 1e-3
    from student.loop import _Run  # the training step's dispatch hands the tokenizer's size on

    cfg = TrainConfig(cache=str(same_cache), student="s", out="o", stage=2, method="kd")
    terms = _Run(cfg, padded, None, None, False, [], [], vocab=size)._terms(batch, False)
    torch.testing.assert_close(terms["kd"], reference, rtol=1e-5, atol=1e-6)
