"""`pipeline dump-teacher` on tiny random-weight VLMs saved to disk and loaded by path."""

import itertools
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipeline.dump import dump_teacher
from pipeline.dump_config import DumpConfig
from pipeline.vlm.models import load_vlm
from pipeline.store.reader import CacheReader
from pipeline.vlm.data import read_samples
from pipeline.vlm.generation import GenerationSettings, VLLMGenerator
from pipeline.vlm.prompting import render
from pipeline.store.teacher_head import load_teacher_head
from pipeline.store.verify import verify_cache

FAMILIES = [("qwen2-vl-tiny", "qwen2"), ("internvl-tiny", "tiny-bpe"), ("llava-onevision-tiny", "tiny-bpe")]


def dump(model_dir, out, **kw):
    cfg = DumpConfig(model=str(model_dir), data=kw.pop("data", "easy-vqa:train"), out=str(out), **kw)
    return dump_teacher(cfg, progress=False)


def direct_forward(vlm, messages, images, answer):
    """Hidden states and ids of the whole conversation, rendered and processed in one piece."""
    full = messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    kwargs = {"images": images} if images else {}
    prompt_text = vlm.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full_text = vlm.processor.apply_chat_template(full, tokenize=False)
    prompt_len = vlm.processor(text=[prompt_text], return_tensors="pt", **kwargs)["input_ids"].shape[1]
    inputs = vlm.processor(text=[full_text], return_tensors="pt", **kwargs)
    with torch.no_grad():
        hidden = vlm.model(**inputs, output_hidden_states=True).hidden_states[-1][0]
    return hidden, inputs["input_ids"][0], prompt_len


def assert_bf16_close(stored: np.ndarray, direct: torch.Tensor):
    """Stored bf16 equals the fp32 forward rounded to bf16, up to batching noise of one bf16 step."""
    direct = direct.numpy()
    assert np.all(np.abs(stored - direct) <= np.abs(direct) * 2**-7 + 1e-6)


@pytest.mark.parametrize("family, tokenizer", FAMILIES)
def test_cache_matches_a_direct_forward(tmp_path, tiny_vlm_dir, family, tokenizer):
    model_dir = tiny_vlm_dir(family, tokenizer)
    stats = dump(model_dir, tmp_path / "c", limit=12, top_k=16, question_features_fraction=0.5, max_batch_tokens=600)
    assert stats.written == 12 and stats.rejected == 0
    assert verify_cache(tmp_path / "c").ok
    reader = CacheReader(tmp_path / "c")
    vlm = load_vlm(model_dir)
    weight, bias = load_teacher_head(tmp_path / "c", reader.manifest)
    eot = set(reader.manifest.teacher.end_of_turn_token_ids)
    with_questions = 0
    for sid in reader.sample_ids:
        cached, meta = reader.get(sid), reader.sample_meta(sid)
        images = [_load(ref) for ref in meta["images"]]
        hidden, ids, prompt_len = direct_forward(vlm, meta["messages"], images, meta["answer"])
        n = len(cached.target_ids)
        # targets: the answer in the teacher's tokens, ending with the end-of-turn token
        assert cached.target_ids[-1] in eot
        assert vlm.tokenizer.decode(cached.target_ids[:-1]).strip() == meta["answer"]
        assert ids[prompt_len : prompt_len + n].tolist() == cached.target_ids.tolist()
        # features at the last prompt position and every answer position but the last
        assert_bf16_close(cached.features_float32(), hidden[prompt_len - 1 : prompt_len + n - 1])
        if cached.question_features is not None:
            with_questions += 1
            assert_bf16_close(cached.question_features_float32(), hidden[:prompt_len])
        # top-k is the top-k of the cached head applied to the cached features
        logprobs = torch.log_softmax(torch.from_numpy(cached.features_float32()) @ weight.float().T, -1)
        top = logprobs.topk(16, -1)
        assert np.array_equal(cached.topk_ids, top.indices.numpy())
        np.testing.assert_allclose(cached.topk_logprobs.astype(np.float32), top.values.numpy(), atol=2e-2, rtol=1e-3)
    assert 0 < with_questions < 12


def _load(ref):
    from pipeline.vlm.data import image_root_for
    from pipeline.vlm.images import resolve_under
    from PIL import Image

    kind, rel = ref.split(":", 1)
    return Image.open(resolve_under(image_root_for("easy-vqa:train"), rel)).convert("RGB")


def test_two_workers_give_the_same_cache_as_one(tmp_path, tiny_vlm_dir):
    model_dir = tiny_vlm_dir("internvl-tiny", "tiny-bpe")
    common = dict(limit=20, top_k=8, max_batch_tokens=1, shard_target_tokens=16)
    dump(model_dir, tmp_path / "one", **common)
    for index in (0, 1):
        dump(model_dir, tmp_path / "two", num_workers=2, worker_index=index, **common)
    one, two = CacheReader(tmp_path / "one"), CacheReader(tmp_path / "two")
    assert sorted(one.sample_ids) == sorted(two.sample_ids) and len(one) == 20
    assert {two.indexes[s].writer_id for s in two.shards} == {"w00000", "w00001"}
    for sid in one.sample_ids:
        a, b = one.get(sid), two.get(sid)
        for name in ("target_ids", "features", "topk_ids", "topk_logprobs", "logsumexp"):
            assert np.array_equal(getattr(a, name), getattr(b, name)), (sid, name)


def test_rerun_resumes_without_redoing_work(tmp_path, tiny_vlm_dir):
    model_dir = tiny_vlm_dir("internvl-tiny", "tiny-bpe")
    first = dump(model_dir, tmp_path / "c", limit=10, top_k=4)
    again = dump(model_dir, tmp_path / "c", limit=16, top_k=4)
    assert (first.written, again.written, again.skipped) == (10, 6, 10)
    assert len(CacheReader(tmp_path / "c")) == 16


def test_generated_responses_are_recorded_and_filtered(tmp_path, tiny_vlm_dir):
    model_dir = tiny_vlm_dir("internvl-tiny", "tiny-bpe")
    stats = dump(
        model_dir, tmp_path / "c", limit=6, top_k=4, responses="generate", backend="hf",
        keep_if_correct=True, on_incorrect="reference",
        generation=GenerationSettings(max_new_tokens=5),
    )
    reader = CacheReader(tmp_path / "c")
    manifest = reader.manifest
    assert manifest.responses.source == "generate" and manifest.responses.backend == "hf"
    assert manifest.responses.sampling["max_new_tokens"] == 5 and manifest.responses.on_incorrect == "reference"
    log = [json.loads(line) for line in (tmp_path / "c" / "responses" / "w00000.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all("response" in r for r in log)
    assert stats.written == 6  # disagreeing answers fell back to the reference


@pytest.mark.parametrize(
    "keep, on_incorrect, record, reference, expected",
    [
        (False, "reference", {"response": "a square"}, "circle", ("a square", None)),
        (True, "reference", {"response": "It is a circle."}, "circle", ("It is a circle.", None)),
        (True, "reference", {"response": "a square"}, "circle", ("circle", None)),
        (True, "reject", {"response": "a square"}, "circle", (None, "generated answer disagrees with the reference 'circle'")),
        (True, "reject", {"error": "image: cannot decode x.png"}, "circle", (None, "image: cannot decode x.png")),
        (True, "reject", None, "circle", (None, "no generated response (the generation phase did not reach it)")),
    ],
)
def test_choose_answer(keep, on_incorrect, record, reference, expected):
    from pipeline.response_log import choose_answer

    cfg = DumpConfig(model="m", data="d", out="o", keep_if_correct=keep, on_incorrect=on_incorrect)
    assert choose_answer(cfg, record, reference) == expected


def test_in_memory_images_travel_with_the_cache(tmp_path, tiny_vlm_dir, tiny_image):
    import io

    import datasets

    from pipeline.vlm.images import open_image_ref

    buf = io.BytesIO()
    tiny_image.save(buf, format="PNG")
    rows = [{"messages": [{"role": "user", "content": "<image>What shape?"}, {"role": "assistant", "content": "circle"}],
             "images": [{"bytes": buf.getvalue(), "path": None}]}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    dump(tiny_vlm_dir("internvl-tiny", "tiny-bpe"), tmp_path / "c", data=str(tmp_path / "d.parquet"), top_k=4)
    reader = CacheReader(tmp_path / "c")
    (ref,) = reader.sample_meta(reader.sample_ids[0])["images"]
    assert ref.startswith("sha256:")
    image = open_image_ref(ref, tmp_path / "c", None)
    assert image.tobytes() == tiny_image.convert("RGB").tobytes()


def generated_log(cache):
    lines = (cache / "responses" / "w00000.jsonl").read_text().splitlines()
    return {r["sample_id"]: r["response"] for r in map(json.loads, lines)}


def test_generate_batch_size_leaves_greedy_answers_and_cache_unchanged(tmp_path, tiny_vlm_dir):
    model_dir = tiny_vlm_dir("internvl-tiny", "tiny-bpe")
    common = dict(limit=7, top_k=4, responses="generate", backend="hf", generation=GenerationSettings(max_new_tokens=6))
    one = dump(model_dir, tmp_path / "b1", generate_batch_size=1, **common)
    five = dump(model_dir, tmp_path / "b5", generate_batch_size=5, **common)
    assert generated_log(tmp_path / "b1") == generated_log(tmp_path / "b5")
    assert len(generated_log(tmp_path / "b1")) == 7 and any(generated_log(tmp_path / "b1").values())
    a, b = CacheReader(tmp_path / "b1"), CacheReader(tmp_path / "b5")
    assert sorted(a.sample_ids) == sorted(b.sample_ids) and len(a) == 7
    for sid in a.sample_ids:
        assert a.sample_meta(sid)["answer"] == b.sample_meta(sid)["answer"] == generated_log(tmp_path / "b1")[sid]
        assert np.array_equal(a.get(sid).target_ids, b.get(sid).target_ids)
    for stats in (one, five):  # both phases are counted, apart
        assert stats.generate_seconds > 0 and stats.feature_seconds > 0
        assert stats.total_seconds >= stats.generate_seconds + stats.feature_seconds


def test_each_image_is_decoded_once_for_generation_and_features(tmp_path, tiny_vlm_dir, monkeypatch):
    import collections

    import pipeline.vlm.data

    decoded = collections.Counter()
    read_samples = pipeline.vlm.data.read_samples

    def counting(*args, **kwargs):
        for sample in read_samples(*args, **kwargs):
            for spec in getattr(sample, "images", []):
                spec.load = _counted(spec.load, sample.sample_id, decoded)
            yield sample

    monkeypatch.setattr(pipeline.vlm.data, "read_samples", counting)  # my_slice (pipeline/dump_config.py) reads it there
    stats = dump(tiny_vlm_dir("internvl-tiny", "tiny-bpe"), tmp_path / "c", limit=5, top_k=4, responses="generate",
                 backend="hf", generation=GenerationSettings(max_new_tokens=3))
    assert stats.written == 5
    assert sorted(decoded) == [f"easy-vqa:train:{i}" for i in range(5)] and set(decoded.values()) == {1}


def _counted(load, key, counter):
    def wrapped():
        counter[key] += 1
        return load()

    return wrapped


def test_dataset_responses_spend_no_generation_time(tmp_path, tiny_vlm_dir):
    stats = dump(tiny_vlm_dir("internvl-tiny", "tiny-bpe"), tmp_path / "c", limit=3, top_k=4)
    assert stats.generate_seconds == 0 and stats.feature_seconds > 0 and not (tmp_path / "c" / "responses").exists()


def _standin_record(entry: dict) -> None:
    with open(os.environ["GENRECAL_STANDIN_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\n")


class _RecordingEngine:
    """Stands in for vllm.LLM in the dump's vLLM child: records each call in GENRECAL_STANDIN_LOG."""

    def generate(self, requests, params, use_tqdm=False):
        _standin_record({"event": "generate", "params": params, "prompts": [r["prompt"] for r in requests]})
        return [SimpleNamespace(outputs=[SimpleNamespace(text=" circle ")]) for _ in requests]


class StandInVLLM(VLLMGenerator):
    """The real VLLMGenerator (sampling, requests, engine arguments) on a recording engine: no GPU needed."""

    def __init__(self, model_path, settings, **kwargs):
        super().__init__(model_path, settings, engine=_RecordingEngine(), make_params=dict, **kwargs)
        env = {k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        _standin_record({"event": "engine", "pid": os.getpid(), "env": env, "args": self.engine_args})


def standin_log(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_vllm_phase_runs_in_a_child_on_its_own_gpu_before_the_teacher_loads_and_resumes(tmp_path, tiny_vlm_dir, monkeypatch):
    import pipeline.vlm.data
    import pipeline.response_log

    record = tmp_path / "standin.jsonl"
    monkeypatch.setattr(pipeline.dump, "resolve_backend", lambda backend: "vllm")
    monkeypatch.setattr(pipeline.response_log, "VLLM_GENERATOR", "tests.test_dump:StandInVLLM")
    monkeypatch.setenv("GENRECAL_STANDIN_LOG", str(record))
    for name, value in dict(LOCAL_RANK="1", RANK="1", WORLD_SIZE="2", MASTER_PORT="29500", CUDA_VISIBLE_DEVICES="4,5,6,7").items():
        monkeypatch.setenv(name, value)  # like torchrun's second worker on a node whose GPUs 4-7 are visible
    load_teacher, child_alive_at_load = pipeline.dump.load_teacher, []

    def checked_load(cfg):  # the engine's process must be gone (its GPU memory with it) before the teacher loads
        child_alive_at_load.extend(_alive(e["pid"]) for e in standin_log(record) if e["event"] == "engine")
        return load_teacher(cfg)

    monkeypatch.setattr(pipeline.dump, "load_teacher", checked_load)
    model_dir = tiny_vlm_dir("internvl-tiny", "tiny-bpe")
    first = dump(model_dir, tmp_path / "c", limit=4, top_k=4, responses="generate", max_length=600)
    (engine,) = [e for e in standin_log(record) if e["event"] == "engine"]
    assert engine["pid"] != os.getpid() and child_alive_at_load == [False]
    assert engine["env"] == {"CUDA_VISIBLE_DEVICES": "5", "RANK": None, "LOCAL_RANK": None, "WORLD_SIZE": None,
                             "MASTER_PORT": None}
    args = engine["args"]
    assert (args["dtype"], args["max_model_len"], args["limit_mm_per_prompt"]) == ("bfloat16", 600, {"image": 1})
    reader = CacheReader(tmp_path / "c")
    sampling = reader.manifest.responses.sampling  # what the manifest records is what vLLM was sent
    (call,) = [e for e in standin_log(record) if e["event"] == "generate"]
    renamed = {("max_tokens" if k == "max_new_tokens" else k): v for k, v in sampling.items()}
    assert call["params"] == renamed and set(sampling["stop_token_ids"]) >= set(reader.manifest.teacher.end_of_turn_token_ids)
    assert reader.manifest.responses.backend == "vllm" and first.written == 4 and first.generate_seconds > 0
    assert {reader.sample_meta(sid)["answer"] for sid in reader.sample_ids} == {"circle"}
    again = dump(model_dir, tmp_path / "c", limit=6, top_k=4, responses="generate", max_length=600)
    assert (again.written, again.skipped) == (2, 4)
    assert len([e for e in standin_log(record) if e["event"] == "engine"]) == 2
    assert set(generated_log(tmp_path / "c")) == {f"easy-vqa:train:{i}" for i in range(6)}
    dump(model_dir, tmp_path / "c", limit=6, top_k=4, responses="generate", max_length=600)
    assert len([e for e in standin_log(record) if e["event"] == "engine"]) == 2  # all done: no engine is started


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_vllm_phase_never_sends_a_prompt_over_max_length(tmp_path, tiny_vlm_dir, monkeypatch):
    import pipeline.vlm.data
    import pipeline.response_log
    from pipeline.response_log import prompt_length

    record = tmp_path / "standin.jsonl"
    monkeypatch.setattr(pipeline.dump, "resolve_backend", lambda backend: "vllm")
    monkeypatch.setattr(pipeline.response_log, "VLLM_GENERATOR", "tests.test_dump:StandInVLLM")
    monkeypatch.setenv("GENRECAL_STANDIN_LOG", str(record))
    model_dir = tiny_vlm_dir("internvl-tiny", "tiny-bpe")
    vlm = load_vlm(model_dir)
    samples = list(itertools.islice(read_samples("easy-vqa:train"), 8))
    lengths = {s.sample_id: prompt_length(vlm.processor, render(vlm.processor, s.messages, True), [i.load() for i in s.images])
               for s in samples}
    max_length = sorted(lengths.values())[4] + 1  # the longer prompts leave no room for an answer
    too_long = {sid for sid, n in lengths.items() if n + 2 > max_length}
    assert 0 < len(too_long) < 8
    dump(model_dir, tmp_path / "c", limit=8, top_k=4, responses="generate", max_length=max_length, max_reject_fraction=1.0)
    sent = [p for e in standin_log(record) if e["event"] == "generate" for p in e["prompts"]]
    assert len(sent) == 8 - len(too_long)
    rejects = {r["sample_id"]: r for r in CacheReader(tmp_path / "c").rejects_table().to_pylist()}
    for sid in too_long:
        assert rejects[sid]["stage"] == "length" and "leaves no room for an answer" in rejects[sid]["reason"], rejects[sid]


def test_max_images_and_long_prompts_are_rejected_before_generation(tmp_path, tiny_vlm_dir, tiny_image):
    root = tmp_path / "images"
    root.mkdir()
    tiny_image.save(root / "a.png")
    def record(rid, images, question):
        turns = [{"from": "human", "value": "<image>" * len(images) + question}, {"from": "gpt", "value": "circle"}]
        return {"id": rid, "image": images, "conversations": turns}

    data = tmp_path / "data.json"
    data.write_text(json.dumps([record("one", ["a.png"], "What shape?"), record("two", ["a.png", "a.png"], "Same?"),
                                record("long", ["a.png"], "Describe " * 200)]))
    stats = dump(tiny_vlm_dir("internvl-tiny", "tiny-bpe"), tmp_path / "c", data=str(data), image_root=str(root),
                 top_k=4, responses="generate", backend="hf", max_images=1, max_length=300,
                 generation=GenerationSettings(max_new_tokens=3))
    assert stats.written == 1
    rejects = {r["sample_id"]: r for r in CacheReader(tmp_path / "c").rejects_table().to_pylist()}
    assert rejects["two"]["stage"] == "images" and rejects["two"]["reason"] == "2 images > --max-images 1"
    assert rejects["long"]["stage"] == "length" and "leaves no room for an answer" in rejects["long"]["reason"]
    log = {r["sample_id"]: r for r in map(json.loads, (tmp_path / "c" / "responses" / "w00000.jsonl").read_text().splitlines())}
    assert "two" not in log and "response" not in log["long"] and "response" in log["one"]  # never generated


def test_vllm_child_environment_under_torchrun():
    from pipeline.response_log import GenerationPhaseError, vllm_child_env

    plain = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "3"}
    assert vllm_child_env(plain, 1) == plain  # not under torchrun: untouched
    torchrun = {"PATH": "/bin", "LOCAL_RANK": "2", "RANK": "10", "WORLD_SIZE": "16", "MASTER_ADDR": "h", "MASTER_PORT": "1",
                "TORCHELASTIC_RUN_ID": "x"}
    assert vllm_child_env(torchrun, 1) == {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "2"}
    assert vllm_child_env(torchrun, 2)["CUDA_VISIBLE_DEVICES"] == "4,5"
    narrowed = {**torchrun, "LOCAL_RANK": "1", "CUDA_VISIBLE_DEVICES": "4,5,6,7"}
    assert vllm_child_env(narrowed, 2)["CUDA_VISIBLE_DEVICES"] == "6,7"
    with pytest.raises(GenerationPhaseError, match="LOCAL_RANK 2 needs GPUs 4..5 of CUDA_VISIBLE_DEVICES=4,5,6,7"):
        vllm_child_env({**narrowed, "LOCAL_RANK": "2"}, 2)


def test_the_dump_stores_the_teachers_token_embeddings(tmp_path, tiny_vlm_dir):
    """teacher/embed_tokens.safetensors holds, per id, the input embedding the teacher's forward uses: the
    weight row for Qwen2-VL, the row times sqrt(d) for Gemma 3 (its scaled embedding)."""
    import math

    from pipeline.store.teacher_embeddings import load_teacher_embeddings
    from pipeline.vlm.tiny import build_tiny_vlm

    gemma = build_tiny_vlm("gemma3-tiny", tmp_path / "gemma", tokenizer="tiny-bpe", hidden_size=64,
                           num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=128)
    for folder, scale in ((tiny_vlm_dir("qwen2-vl-tiny", "qwen2"), 1.0), (gemma, math.sqrt(64))):
        out = tmp_path / f"cache-{scale}"
        stats = dump_teacher(DumpConfig(model=str(folder), data="easy-vqa:train", out=str(out), limit=2, top_k=4),
                             progress=False)
        assert stats.written == 2
        table = load_teacher_embeddings(out, CacheReader(out).manifest)
        weight = load_vlm(folder).model.get_input_embeddings().weight.detach()
        assert table.shape == weight.shape
        torch.testing.assert_close(table, weight * scale, rtol=1e-6, atol=1e-6)
