"""What the README promises about a dump, checked where it happens: the keep-if-correct filter on the
stored answers, the response log on a rerun, torchrun's worker split, and the head only at stored positions."""

import json
import re

import pytest
from click.testing import CliRunner

from pipeline.dump import DumpStats, dump_teacher
from pipeline.dump_config import DumpConfig, workers_from_env
from pipeline.store.reader import CacheReader
from pipeline.vlm.data import read_samples
from pipeline.vlm.generation import GenerationSettings, HFGenerator

TEACHER = ("internvl-tiny", "tiny-bpe")


def dump(model_dir, out, **kw):
    return dump_teacher(DumpConfig(model=str(model_dir), data="easy-vqa:train", out=str(out), top_k=4, **kw),
                        progress=False)


def references(n):
    return {s.sample_id: s.answer for s, _ in zip(read_samples("easy-vqa:train"), range(n))}


def logged(cache):
    lines = (cache / "responses" / "w00000.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.endswith("}")]


def stored_answers(cache):
    reader = CacheReader(cache)
    return {sid: reader.sample_meta(sid)["answer"] for sid in reader.sample_ids}


def states(response: str, reference: str) -> bool:
    """Written out here, apart from pipeline.vlm.answers: the reference word stands in the response."""
    return reference.lower() in re.findall(r"[a-z]+", response.lower())


def test_keep_if_correct_stores_agreeing_answers_and_falls_back_to_the_reference(tmp_path, tiny_vlm_dir):
    cache = tmp_path / "c"
    stats = dump(tiny_vlm_dir(*TEACHER), cache, limit=6, responses="generate", backend="hf", keep_if_correct=True,
                 on_incorrect="reference", generation=GenerationSettings(max_new_tokens=5))
    responses = {r["sample_id"]: r["response"] for r in logged(cache)}
    refs, stored = references(6), stored_answers(cache)
    assert stats.written == 6 and set(stored) == set(responses) == set(refs)
    for sid, answer in stored.items():
        expected = responses[sid] if states(responses[sid], refs[sid]) else refs[sid]
        assert answer == expected, (sid, responses[sid], refs[sid], answer)
    # a random teacher mostly disagrees: the filter must have replaced some of its answers
    assert any(stored[sid] == refs[sid] != responses[sid] for sid in stored)


def test_keep_if_correct_with_reject_refuses_disagreeing_answers(tmp_path, tiny_vlm_dir):
    cache = tmp_path / "c"
    (cache / "responses").mkdir(parents=True)
    # references: rectangle, blue, yes, no, no, yes (two disagree: under the dump's reject-fraction limit)
    answers = ["It is a rectangle.", "red", "Yes, it is.", "yes", "No.", "yes"]
    records = [{"sample_id": f"easy-vqa:train:{i}", "response": a} for i, a in enumerate(answers)]
    (cache / "responses" / "w00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    stats = dump(tiny_vlm_dir(*TEACHER), cache, limit=6, responses="generate", backend="hf", keep_if_correct=True,
                 on_incorrect="reject")
    kept = {0: "It is a rectangle.", 2: "Yes, it is.", 4: "No.", 5: "yes"}
    assert stored_answers(cache) == {f"easy-vqa:train:{i}": a for i, a in kept.items()}
    assert (stats.written, stats.rejected, stats.reject_reasons) == (4, 2, {"generate": 2})
    reasons = {r["sample_id"]: r["reason"] for r in CacheReader(cache).rejects_table().to_pylist()}
    assert reasons == {"easy-vqa:train:1": "generated answer disagrees with the reference 'blue'",
                       "easy-vqa:train:3": "generated answer disagrees with the reference 'no'"}


def test_a_rerun_does_not_generate_logged_answers_again(tmp_path, tiny_vlm_dir, monkeypatch):
    prompts = []
    generate = HFGenerator.generate

    def counting(self, batch):
        prompts.extend(batch)
        return generate(self, batch)

    monkeypatch.setattr(HFGenerator, "generate", counting)
    cache = tmp_path / "c"
    (cache / "responses").mkdir(parents=True)
    # answers logged by a run killed before it committed anything; its last line was cut short
    (cache / "responses" / "w00000.jsonl").write_text(
        '{"sample_id": "easy-vqa:train:0", "response": "logged zero"}\n'
        '{"sample_id": "easy-vqa:train:1", "response": "logged one"}\n{"sample_id": "easy-vqa:train:2", "resp')
    common = dict(responses="generate", backend="hf", generation=GenerationSettings(max_new_tokens=3))
    first = dump(tiny_vlm_dir(*TEACHER), cache, limit=3, **common)
    assert len(prompts) == 1  # only sample 2, whose line was cut short
    stored = stored_answers(cache)
    assert first.written == 3 and (stored["easy-vqa:train:0"], stored["easy-vqa:train:1"]) == ("logged zero", "logged one")
    again = dump(tiny_vlm_dir(*TEACHER), cache, limit=4, **common)
    assert len(prompts) == 2 and (again.written, again.skipped) == (1, 3)  # sample 3 only
    ids = [r["sample_id"] for r in logged(cache)]
    assert sorted(ids) == [f"easy-vqa:train:{i}" for i in range(4)]  # one record per sample
    assert stored_answers(cache)["easy-vqa:train:2"] == next(r["response"] for r in logged(cache)
                                                             if r["sample_id"] == "easy-vqa:train:2")


def test_workers_come_from_torchrun_unless_given(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert workers_from_env(None, None) == (1, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert workers_from_env(None, None) == (4, 3)
    assert workers_from_env(2, 1) == (2, 1)  # explicit flags win


@pytest.mark.parametrize("flags, expected", [([], (4, 3)), (["--num-workers", "2", "--worker-index", "0"], (2, 0))])
def test_dump_teacher_under_torchrun_is_one_worker_per_rank(tmp_path, monkeypatch, flags, expected):
    import pipeline.dump
    from pipeline.cli import main as pipeline_cli

    configs = []
    monkeypatch.setattr(pipeline.dump, "dump_teacher", lambda cfg, progress: configs.append(cfg) or DumpStats())
    args = ["dump-teacher", "--model", "m", "--data", "easy-vqa:train", "--out", str(tmp_path / "c"), *flags]
    result = CliRunner().invoke(pipeline_cli, args, env={"WORLD_SIZE": "4", "RANK": "3"})  # what torchrun sets
    assert result.exit_code == 0, result.output
    assert [(c.num_workers, c.worker_index) for c in configs] == [expected]
    assert f"worker {expected[1]}/{expected[0]}:" in result.output


def test_the_teacher_head_runs_only_at_stored_positions(tmp_path, tiny_vlm_dir, monkeypatch):
    import pipeline.dump
    from pipeline.store.teacher_head import TeacherHead
    from pipeline.vlm.models import lm_head_and_scaling

    model_lm_head, head_rows = [], []
    load = pipeline.dump.load_teacher

    def load_and_watch(cfg):
        teacher = load(cfg)
        module, _, _ = lm_head_and_scaling(teacher.model)
        module.register_forward_hook(lambda m, args, out: model_lm_head.append(args[0].shape))
        return teacher

    logits = TeacherHead.logits

    def counting(self, features):
        head_rows.append(len(features))
        return logits(self, features)

    monkeypatch.setattr(pipeline.dump, "load_teacher", load_and_watch)
    monkeypatch.setattr(TeacherHead, "logits", counting)
    stats = dump(tiny_vlm_dir(*TEACHER), tmp_path / "c", limit=5, question_features_fraction=1.0)
    reader = CacheReader(tmp_path / "c")
    stored = sum(len(reader.get(sid).target_ids) for sid in reader.sample_ids)
    assert model_lm_head == []  # the model's own forward never reached its lm_head
    assert sum(head_rows) == stored == stats.stored_tokens  # one head row per stored position
    assert stats.tokens > 3 * stored  # while the body ran over every prompt position too
