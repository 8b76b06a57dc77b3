"""Each method is one declaration (student/methods.py): what it reads, checks, trains and computes per stage, and
the CLI's list. Adding one is a declaration in that file; here a toy method is declared inside a test, and trains
and checks through the normal entry points without any other change."""

import dataclasses
import json

import pytest
import torch
from click.testing import CliRunner

from student.cli import main
from student.config import TrainConfig
from student.methods import (
    METHODS,
    SFT,
    Beside,
    Method,
    Stage,
    StepParts,
    check_config,
    methods_help,
    sft_loss,
    stage_of,
)


def _cfg(method, stage, **kw):
    return TrainConfig(cache="c", student="s", out="o", stage=stage, method=method, **kw)


# what the former comparisons of names decided, per (method, stage): head, layers, one tokenizer, top-k always,
# top-k with --teacher-distribution topk, tempered top-k KL, what trains beside the student
EXPECTED = {
    ("genrecal", 1): (True, False, False, False, True, True, "Recalibrator"),
    ("genrecal", 2): (True, False, False, False, True, True, "Recalibrator"),
    ("genrecal", 3): (False, False, False, False, False, True, ""),
    ("vlsi", 1): (True, True, True, False, False, True, "verbalizers"),
    ("vlsi", 2): (True, True, True, False, True, True, "verbalizers"),
    ("vlsi", 3): (False, False, False, False, False, True, ""),
    ("kd", 2): (False, False, True, True, False, True, ""),
    ("uld", 2): (False, False, False, True, False, False, ""),
}


def test_the_declarations_say_what_each_stage_reads_and_checks():
    found = {(name, number): (st.teacher_head, st.layers, st.shared_tokenizer, st.topk, st.topk_if_asked, st.tempered,
                              st.beside)
             for name, method in METHODS.items() for number, st in method.stages.items()}
    assert found == EXPECTED
    assert all(METHODS[name].stages[3] is SFT for name in ("genrecal", "vlsi"))  # one SFT stage, shared
    assert stage_of(_cfg("kd", 2)).terms == ("student_ce", "kd", "paired_share", "total")
    assert [list(m.checked_stages()) for m in METHODS.values()] == [[1, 2, 3], [2, 3], [2, 3], [1, 2, 3]]


def test_the_config_asks_the_declaration():
    for method in ("kd", "uld"):
        with pytest.raises(ValueError, match=f"--method {method} is a stage-2 run.*use --stage 2 --cache"):
            _cfg(method, 1)
        with pytest.raises(ValueError, match="stage-2 run"):
            TrainConfig(cache=None, data="easy-vqa:train", student="s", out="o", stage=3, method=method)
    with pytest.raises(ValueError, match="--student-layers and --teacher-verbalizers are --method vlsi options"):
        _cfg("kd", 2, teacher_verbalizers="tv")
    with pytest.raises(ValueError, match="unknown --method 'nope': one of genrecal, uld, kd, vlsi"):
        _cfg("nope", 2)
    with pytest.raises(ValueError, match="does not support --fsdp"):
        _cfg("vlsi", 1, fsdp=True)
    check_config(_cfg("vlsi", 2, student_layers="1,2"))


def test_the_cli_lists_the_methods_from_the_declarations():
    train = {p.name: p for p in main.commands["train"].params}["method"]
    check = {p.name: p for p in main.commands["check"].params}["method"]
    assert tuple(train.type.choices) == tuple(check.type.choices) == tuple(METHODS)
    assert train.help.startswith(methods_help()) and all(m.summary in train.help for m in METHODS.values())
    help_text = " ".join(CliRunner().invoke(main, ["check", "--help"]).output.split())
    assert "genrecal: 1, 2, 3; uld: 2, 3; kd: 2, 3; vlsi: 1, 2, 3" in help_text


# -- a method declared here: the student's CE plus a penalty on one scalar that trains beside it -----------

def _toy_loss(p: StepParts, batch, measure_reliance: bool = False) -> dict:
    terms = sft_loss(p, batch)
    terms["toy_penalty"] = p.beside.weight.square().sum()
    terms["total"] = terms["student_ce"] + 0.1 * terms["toy_penalty"]
    return terms


def _toy_prepare(cfg, reader, out, resumed, model):
    return {"resumed": resumed, "samples": len(reader)}  # cheap, before the student loads


def _toy_build(cfg, prepared, vlm, manifest, device) -> Beside:
    scale = torch.nn.Linear(1, 1, bias=False).to(device)
    torch.nn.init.constant_(scale.weight, 2.0)

    def save(folder):
        folder.mkdir(parents=True)
        (folder / "scale.json").write_text(json.dumps({"weight": scale.weight.item(), "prepared": prepared}))

    return Beside(scale, list(scale.parameters()), {"toy": scale}, {"toy_scale": save}, "one scalar")


TOY = Method("toy", "a test's method", {2: Stage(terms=("student_ce", "toy_penalty", "total"), loss=_toy_loss,
                                                 beside="toy scale", prepare=_toy_prepare, build=_toy_build)})


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(METHODS, TOY.name, TOY)
    return TOY


def test_a_method_declared_in_a_test_trains_and_checks_through_the_normal_entry_points(toy, tmp_path, pair_cache,
                                                                                     pair_student):
    from pipeline.store.reader import CacheReader
    from student.check import check_pair
    from student.train import train_stage

    cfg = TrainConfig(cache=str(pair_cache), student=str(pair_student.path), out=str(tmp_path / "toy"), stage=2,
                      method="toy", steps=1, batch_size=2, lr=1e-2, num_workers=0)
    (record,) = train_stage(cfg, progress=False)
    assert set(record) >= {"student_ce", "toy_penalty", "total", "grad_norm_beside"} and "ce" not in record
    assert record["toy_penalty"] == pytest.approx(4.0) and record["grad_norm_beside"] > 0
    saved = json.loads((tmp_path / "toy" / "stage2" / "toy_scale" / "scale.json").read_text())
    assert saved["weight"] < 2.0 and saved["prepared"] == {"resumed": False, "samples": len(CacheReader(pair_cache))}
    with pytest.raises(ValueError, match="--method toy is a stage-2 run"):
        dataclasses.replace(cfg, stage=1)
    report = check_pair(str(pair_student.path), str(pair_cache), method="toy", batch_size=2)
    assert report.ok, report.text()
    assert "stage 2 toy scale: one scalar" in report.text() and "+ toy scale" in report.text()
