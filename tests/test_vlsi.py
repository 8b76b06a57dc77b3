"""--method vlsi: verbalizers from cached layers equal verbalizers from a live teacher, the order-preserving layer
matching, the chunked verbalized KL against a naive one, and the three stages end to end."""

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.store.teacher_head import TeacherHead
from student.config import TrainConfig
from student.losses import HeadTarget, head_losses
from student.train import train_stage
from student.vlsi import Verbalizers, default_student_layers, match_layers, student_layers
from student.vlsi_step import matched_layer_kl
from tests.vlsi_fixtures import TEACHER_LAYERS, same_cache, same_cache_without_layers, same_student  # noqa: F401
from tests.vlsi_fixtures import same_teacher_dir  # noqa: F401


def config(cache, student, out, stage, **kw):
    return TrainConfig(cache=str(cache), student=str(student.path), out=str(out), stage=stage, method="vlsi",
                       **{"steps": 3, "batch_size": 4, "lr": 1e-3, "lr_end": 1e-4, "num_workers": 0, **kw})


def weights(folder):
    (path,) = Path(folder).glob("*.safetensors")
    return load_file(str(path))


# -- the layer matching -------------------------------------------------------------------------------------------
def test_the_matching_takes_the_smallest_kl_in_its_window_and_never_goes_back():
    kl = [[5, 1, 0, 9, 9, 9],  # window {0, 1}: 1 (the 0 at teacher layer 2 lies outside it)
          [0, 9, 3, 2, 9, 9],  # window {2, 3}: 3 (the 0 at layer 0 lies behind the previous match)
          [9, 9, 9, 9, 4, 4],  # window {4, 5}: a tie goes to the shallower layer, 4
          [0, 0, 0, 0, 0, 7]]  # window {5} (cut at the last layer): 5, whatever the earlier layers' KL
    asked = []
    matches = match_layers(lambda i, j: asked.append((i, j)) or kl[i][j], 4, 6, window=2)
    assert matches == [1, 3, 4, 5]
    assert asked == [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5), (3, 5)]  # only the candidates are computed
    # once the last teacher layer is matched, later student layers stay on it
    assert match_layers(lambda i, j: [[9, 0], [0, 9], [0, 9]][i][j], 3, 2, window=3) == [1, 1, 1]
    rng = random.Random(0)
    for _ in range(200):
        n_s, n_t, window = rng.randint(1, 6), rng.randint(1, 8), rng.randint(1, 4)
        table = [[rng.random() for _ in range(n_t)] for _ in range(n_s)]
        got = match_layers(lambda i, j: table[i][j], n_s, n_t, window)
        previous = -1
        for i, j in enumerate(got):
            window_of_i = [c for c in range(previous + 1, previous + window + 1) if c < n_t] or [n_t - 1]
            assert j == min(window_of_i, key=lambda c: table[i][c]), (table, got)
            assert j >= previous and (j > previous or previous == n_t - 1)
            previous = j


def test_default_student_layers_are_evenly_spaced_and_the_option_is_checked():
    assert default_student_layers(24, 3) == (6, 12, 18)
    assert default_student_layers(3, 3) == (1, 2)  # a shallow student gets fewer
    assert student_layers(None, 3, TEACHER_LAYERS) == (1, 2)
    assert student_layers((2,), 3, TEACHER_LAYERS) == (2,)
    with pytest.raises(ValueError, match=r"layers \[3\] are outside 1\.\.2"):
        student_layers((1, 3), 3, TEACHER_LAYERS)
    with pytest.raises(ValueError, match="positive and increasing"):
        TrainConfig(cache="c", student="s", out="o", stage=1, method="vlsi", student_layers="2,1")
    with pytest.raises(ValueError, match="--method vlsi options"):
        TrainConfig(cache="c", student="s", out="o", stage=1, student_layers="1")


# -- the chunked verbalized KL against a naive one ------------------------------------------------------------------
def _heads(vocab=300, padding=7, d_t=16, d_s=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    teacher = TeacherHead(3 * torch.randn(vocab + padding, d_t, generator=g), None, 1.0, None)
    student = TeacherHead(3 * torch.randn(vocab + 2 * padding, d_s, generator=g), torch.randn(vocab + 2 * padding,
                                                                                              generator=g), 0.5, 4.0)
    return teacher, student, g


def _naive_kl(t_head, s_head, t, s, vocab, temperature=1.0):
    """Mean over positions of KL(softmax(teacher logits) || softmax(student logits)) in float64, the full vocabulary
    cut to `vocab` on both sides, the heads written out (x W^T + b, scale, soft-cap)."""
    def logits(head, x):
        z = x.double() @ head.weight.double().T + (0 if head.bias is None else head.bias.double())
        z = z * head.logit_scale
        return head.softcap * torch.tanh(z / head.softcap) if head.softcap else z

    p = torch.softmax(logits(t_head, t)[:, :vocab] / temperature, -1)
    log_q = torch.log_softmax(logits(s_head, s)[:, :vocab] / temperature, -1)
    return (p * (p.log() - log_q)).sum(-1).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_chunked_verbalized_kl_equals_the_naive_one_values_and_gradients(temperature):
    t_head, s_head, g = _heads()
    t = torch.randn(23, 16, generator=g)
    x = torch.randn(23, 12, generator=g)
    verbalizer = Verbalizers("student", (4,), 12, seed=3)
    with torch.no_grad():  # away from the zero start, so that every weight gets a gradient
        verbalizer[4].out.weight.normal_(0, 0.3, generator=g)
    s = verbalizer[4](x)
    _, kl = head_losses(s_head, s, None, HeadTarget(t_head, t), chunk_tokens=5, temperature=temperature, vocab=300)
    chunked = torch.autograd.grad(kl, list(verbalizer.parameters()))
    naive = _naive_kl(t_head, s_head, t, verbalizer[4](x), 300, temperature)
    reference = torch.autograd.grad(naive, list(verbalizer.parameters()))
    torch.testing.assert_close(kl.double(), naive, rtol=1e-5, atol=1e-6)
    for a, b in zip(chunked, reference):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-6)
    assert kl > 0.1 and all(a.abs().sum() > 0 for a in chunked)


@pytest.mark.parametrize("chunk_tokens", [4, 1024])
def test_the_last_layer_kl_in_row_chunks_equals_the_naive_one(chunk_tokens):
    """Stage 2's last-layer KL: the teacher head on the cached final features of the paired rows, the student's own
    logits; computed `chunk_tokens` rows at a time."""
    from types import SimpleNamespace

    from student.config import LossConfig
    from student.vlsi_step import last_layer_kl

    t_head, s_head, g = _heads()
    items = [SimpleNamespace(teacher_features=torch.randn(n, 16, generator=g), teacher_topk=None) for n in (6, 9)]
    t_rows = torch.tensor([0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12])  # 4 of the first answer's 6 rows, 7 of the second's 9
    x = torch.randn(len(t_rows), 12, generator=g, requires_grad=True)
    s_logits = s_head.logits(x)
    kl = last_layer_kl(t_head, s_logits, items, t_rows, LossConfig(chunk_tokens=chunk_tokens), 300)
    (grad,) = torch.autograd.grad(kl, x)
    features = torch.cat([item.teacher_features for item in items])[t_rows]
    naive = _naive_kl(t_head, s_head, features, x, 300)
    (ref_grad,) = torch.autograd.grad(naive, x)
    torch.testing.assert_close(kl.double(), naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=1e-4, atol=1e-6)
    assert kl > 0.1


def test_the_matched_layer_kl_equals_the_naive_one_at_the_naive_matches():
    t_head, s_head, g = _heads(seed=1)
    t_layers = [torch.randn(11, 16, generator=g) for _ in range(4)]
    s_layers = [torch.randn(11, 12, generator=g, requires_grad=True) for _ in range(3)]
    layer_kl, matches = matched_layer_kl(t_head, s_head, t_layers, s_layers, window=2, vocab=300, chunk_tokens=4)
    grads = torch.autograd.grad(layer_kl, s_layers)
    table = [[_naive_kl(t_head, s_head, t, s, 300).item() for t in t_layers] for s in s_layers]
    naive_matches, previous = [], -1
    for row in table:  # the rule written out: the window of 2 right after the previous match
        window = [j for j in (previous + 1, previous + 2) if j < len(t_layers)] or [len(t_layers) - 1]
        previous = min(window, key=lambda j: row[j])
        naive_matches.append(previous)
    assert matches == naive_matches
    naive = torch.stack([_naive_kl(t_head, s_head, t_layers[j], s, 300) for s, j in zip(s_layers, matches)]).mean()
    torch.testing.assert_close(layer_kl.double(), naive, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, torch.autograd.grad(naive, s_layers)):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-7)


# -- teacher verbalizers: from the cache = from a live teacher -------------------------------------------------------
def test_teacher_verbalizers_trained_from_the_cache_equal_ones_trained_on_the_live_teacher(tmp_path, same_teacher_dir,
                                                                                         same_student):
    """A bf16 teacher dumped one sample per forward: its cached layers are the live hidden states bit for bit. The
    trainer's stage 1 (from the cache) and a loop here on a live forward's hidden states (same seed, same batches,
    same schedule) end with the same teacher verbalizers."""
    from pipeline.dump import dump_teacher
    from pipeline.dump_config import DumpConfig
    from pipeline.feature_pass import stored_positions
    from pipeline.store.reader import CacheReader
    from pipeline.vlm.images import open_image_ref
    from pipeline.vlm.models import lm_head_and_scaling, load_vlm
    from pipeline.vlm.prompting import collate, encode_sample
    from student.batches import CacheStudentData, batch_order
    from student.train import _lr_factor
    from student.vlsi_step import teacher_verbalizer_ce

    cache = tmp_path / "cache"
    dump_teacher(DumpConfig(model=str(same_teacher_dir), data="easy-vqa:train", out=str(cache), limit=6, top_k=8,
                            dtype="bfloat16", max_batch_tokens=1, layers=TEACHER_LAYERS), progress=False)
    reader = CacheReader(cache)
    assert reader.manifest.features.lossless
    cfg = config(cache, same_student, tmp_path / "run", 1, steps=4, batch_size=2, lr=1e-2, lr_end=1e-3,
                 max_grad_norm=1e9)  # no clipping: the global norm would couple the two sides' verbalizers
    train_stage(cfg, progress=False)
    from_cache = weights(tmp_path / "run" / "stage1" / "teacher_verbalizers")

    teacher = load_vlm(same_teacher_dir, dtype="bfloat16", device="cpu")
    live_rows, targets = {}, {}
    for sid in reader.sample_ids:
        meta = reader.sample_meta(sid)
        images = [open_image_ref(ref, reader.root, reader.manifest.data.image_root) for ref in meta["images"]]
        encoded = encode_sample(teacher.processor, sid, meta["messages"], images, meta["answer"], set(teacher.end_of_turn))
        with torch.no_grad():
            states = teacher.model(**collate([encoded], teacher.pad_id), output_hidden_states=True).hidden_states
        rows = stored_positions(encoded.prompt_len, len(encoded.answer_ids))
        live_rows[sid] = {layer: states[layer][0, rows].float() for layer in TEACHER_LAYERS}
        targets[sid] = torch.tensor(encoded.answer_ids)
        cached = reader.get(sid)
        assert cached.target_ids.tolist() == encoded.answer_ids
        for layer in TEACHER_LAYERS:  # the cache holds the live states exactly
            assert torch.equal(torch.from_numpy(cached.layer_features_float32(layer)), live_rows[sid][layer])

    module, scale, softcap = lm_head_and_scaling(teacher.model)
    head = TeacherHead(module.weight.detach().float(), None, scale, softcap)  # as train.py holds it on CPU
    live = Verbalizers("teacher", TEACHER_LAYERS, 128, seed=cfg.seed)
    optimizer = torch.optim.AdamW(live.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(cfg, s))
    data = CacheStudentData(reader, same_student.processor, same_student.end_of_turn, same_student.pad_id)
    for batch in batch_order(data, cfg)[: cfg.steps]:  # the batches the trainer drew
        sids = [data.sample_ids[i] for i in batch]
        layers = {layer: torch.cat([live_rows[sid][layer] for sid in sids]) for layer in TEACHER_LAYERS}
        loss = teacher_verbalizer_ce(live, head, layers, torch.cat([targets[sid] for sid in sids]),
                                     len(teacher.tokenizer))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    trained = {k: v.detach() for k, v in live.state_dict().items()}
    assert set(trained) == set(from_cache)
    for name, value in trained.items():
        torch.testing.assert_close(from_cache[name], value, rtol=1e-5, atol=1e-7, msg=name)
    start = Verbalizers("teacher", TEACHER_LAYERS, 128, seed=cfg.seed).state_dict()
    assert all(not torch.equal(start[k], trained[k]) for k in trained if k.endswith(("out.weight", "norm")))


# -- the stages ---------------------------------------------------------------------------------------------------
def test_three_vlsi_stages_end_to_end_and_the_stage_3_folder_reloads_and_generates(tmp_path, same_cache, same_student):
    from transformers import AutoModelForImageTextToText

    from pipeline.vlm.processors import load_processor  # AutoProcessor, or its torchvision-free fallback
    from student.trainable import is_vision_encoder
    from tests.tiny_fixtures import make_tiny_image, tiny_messages

    original = weights(same_student.path)
    metrics = {stage: train_stage(config(same_cache, same_student, tmp_path, stage), progress=False) for stage in (1, 2, 3)}
    stage1, stage2, stage3 = (tmp_path / f"stage{n}" for n in (1, 2, 3))
    assert set(metrics[1][0]) >= {"teacher_verbalizer_ce", "student_verbalizer_ce", "total"}
    assert all(torch.equal(weights(stage1)[k], original[k]) for k in original)  # stage 1: backbones frozen
    assert json.loads((stage1 / "teacher_verbalizers" / "verbalizers.json").read_text())["layers"] == list(TEACHER_LAYERS)
    assert json.loads((stage1 / "student_verbalizers" / "verbalizers.json").read_text())["layers"] == [1, 2]
    assert not (same_cache / "teacher_verbalizers").exists() and not (stage1 / "recalibrator").exists()

    record = metrics[2][-1]
    assert {"layer_kl", "last_kl", "student_ce", "total", "match_s1", "match_s2"} <= set(record)
    for m in metrics[2]:
        assert m["match_s1"] in TEACHER_LAYERS and m["match_s2"] in TEACHER_LAYERS and m["match_s1"] <= m["match_s2"]
        assert m["match_s1"] in (1, 2)  # window 2 after nothing: the first two cached layers
    logged = [json.loads(line) for line in (stage2 / "metrics.jsonl").read_text().splitlines()]
    assert [m["match_s2"] for m in logged] == [m["match_s2"] for m in metrics[2]]
    t1, t2 = weights(stage1 / "teacher_verbalizers"), weights(stage2 / "teacher_verbalizers")
    assert set(t1) == set(t2) and all(torch.equal(t1[k], t2[k]) for k in t1)  # frozen in stage 2
    s1, s2 = weights(stage1 / "student_verbalizers"), weights(stage2 / "student_verbalizers")
    assert any(not torch.equal(s1[k], s2[k]) for k in s1)  # the student's verbalizers train in stage 2
    trained = weights(stage2)
    vision = [k for k in original if is_vision_encoder(k)]
    assert vision and all(torch.equal(trained[k], original[k]) for k in vision)
    assert any(not torch.equal(trained[k], original[k]) for k in original if not is_vision_encoder(k))

    assert set(metrics[3][0]) >= {"student_ce", "total"} and not (stage3 / "student_verbalizers").exists()
    model = AutoModelForImageTextToText.from_pretrained(stage3).eval()
    processor = load_processor(stage3)
    reloaded, saved = model.state_dict(), weights(stage3)
    assert all(torch.equal(reloaded[k], v) for k, v in saved.items() if k in reloaded)
    text = processor.apply_chat_template(tiny_messages("What shape is it?"), add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[make_tiny_image()], text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_a_resumed_vlsi_stage_2_continues_with_the_same_losses(tmp_path, same_cache, same_student):
    train_stage(config(same_cache, same_student, tmp_path / "whole", 1, steps=2), progress=False)
    shutil.copytree(tmp_path / "whole" / "stage1", tmp_path / "split" / "stage1")
    whole = train_stage(config(same_cache, same_student, tmp_path / "whole", 2, steps=4), progress=False)
    first = train_stage(config(same_cache, same_student, tmp_path / "split", 2, steps=4), progress=False, stop_after=2)
    rest = train_stage(config(same_cache, same_student, tmp_path / "split", 2, steps=4), resume=True, progress=False)
    assert [m["step"] for m in first + rest] == [1, 2, 3, 4]
    for a, b in zip(whole, first + rest):
        for term in ("layer_kl", "last_kl", "student_ce", "total", "match_s1", "match_s2"):
            assert a[term] == pytest.approx(b[term], rel=1e-5, abs=1e-6), (a["step"], term)


def test_stage_1_reuses_teacher_verbalizers_of_an_earlier_run_without_training_them(tmp_path, same_cache, same_student):
    train_stage(config(same_cache, same_student, tmp_path / "first", 1, steps=2), progress=False)
    given = tmp_path / "first" / "stage1" / "teacher_verbalizers"
    metrics = train_stage(config(same_cache, same_student, tmp_path / "second", 1, steps=2,
                                 teacher_verbalizers=str(given)), progress=False)
    assert all(m["total"] == pytest.approx(m["student_verbalizer_ce"]) for m in metrics)  # the teacher's do not train
    reused = weights(tmp_path / "second" / "stage1" / "teacher_verbalizers")
    assert all(torch.equal(reused[k], v) for k, v in weights(given).items())
    meta = json.loads((given / "verbalizers.json").read_text())
    (given / "verbalizers.json").write_text(json.dumps({**meta, "layers": [1, 2]}))
    with pytest.raises(ValueError, match=r"layers: the folder has \[1, 2\], this run needs \[1, 2, 3\]"):
        train_stage(config(same_cache, same_student, tmp_path / "third", 1, teacher_verbalizers=str(given)),
                    progress=False)


def test_stage_2_takes_stage_1s_student_layers_and_a_resume_keeps_what_the_stage_started_with(tmp_path, same_cache,
                                                                                                same_student):
    train_stage(config(same_cache, same_student, tmp_path / "run", 1, steps=2, student_layers="1"), progress=False)
    metrics = train_stage(config(same_cache, same_student, tmp_path / "run", 2, steps=2), progress=False, stop_after=1)
    assert set(metrics[0]) >= {"match_s1"} and "match_s2" not in metrics[0]  # stage 1's layer 1, not the default 1, 2
    meta = json.loads((tmp_path / "run" / "stage2" / "student_verbalizers" / "verbalizers.json").read_text())
    assert meta["layers"] == [1]
    with pytest.raises(ValueError, match=r"--resume: .* started with --student-layers None"):
        train_stage(config(same_cache, same_student, tmp_path / "run", 2, steps=2, student_layers="2"), resume=True,
                    progress=False)
    given = tmp_path / "run" / "stage1" / "teacher_verbalizers"
    train_stage(config(same_cache, same_student, tmp_path / "other", 1, steps=2), progress=False, stop_after=1)
    with pytest.raises(ValueError, match=r"--resume: .* started without --teacher-verbalizers"):
        train_stage(config(same_cache, same_student, tmp_path / "other", 1, steps=2, teacher_verbalizers=str(given)),
                    resume=True, progress=False)


def test_a_cache_without_layers_or_verbalizers_is_refused_before_the_student_loads(
        tmp_path, same_cache, same_cache_without_layers, same_student, monkeypatch):
    monkeypatch.setattr("student.train.load_vlm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"needs intermediate teacher layers.*--layers"):
        train_stage(config(same_cache_without_layers, same_student, tmp_path / "run", 1), progress=False)
    with pytest.raises(FileNotFoundError, match="--teacher-verbalizers"):
        train_stage(config(same_cache, same_student, tmp_path / "run", 2, from_student=True), progress=False)
    with pytest.raises(FileNotFoundError, match="run --stage 1 first"):
        train_stage(config(same_cache, same_student, tmp_path / "run", 2), progress=False)
    assert not (tmp_path / "run").exists()


def test_vlsi_options_reach_their_fields_and_bad_student_layers_fail_before_the_student_loads(tmp_path, same_cache,
                                                                                             same_student, monkeypatch):
    from click.testing import CliRunner

    from student.cli import main

    seen = []
    monkeypatch.setattr("student.train.train_stage", lambda cfg, **kw: seen.append(cfg) or [])
    args = ["train", "--cache", str(same_cache), "--student", "s", "--out", str(tmp_path / "o"), "--stage", "2",
            "--method", "vlsi", "--student-layers", "1,2", "--match-window", "3", "--teacher-verbalizers", "tv",
            "--verbalizer-kl-weight", "0.5", "--kd-weight", "2"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert (cfg.method, cfg.student_layers, cfg.match_window, cfg.teacher_verbalizers) == ("vlsi", "1,2", 3, "tv")
    assert (cfg.loss.verbalizer_kl_weight, cfg.loss.kd_weight) == (0.5, 2.0)
    monkeypatch.undo()
    monkeypatch.setattr("student.train.load_vlm", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"--student-layers 1,3: layers \[3\] are outside 1\.\.2"):
        train_stage(config(same_cache, same_student, tmp_path / "run", 1, student_layers="1,3"), progress=False)
    assert not (tmp_path / "run").exists()
