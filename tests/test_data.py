"""Data readers for dump-teacher: LLaVA JSON, TRL records (jsonl, parquet, datasets), easy-vqa."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from pipeline.vlm.data import (
    BadSample,
    DataError,
    DataSample,
    ImageError,
    image_root_for,
    read_samples,
    samples_from_records,
)
from pipeline.vlm.images import path_image

IMG = {"type": "image"}
RED, GREEN = (255, 0, 0), (0, 128, 0)


def T(text: str) -> dict:
    return {"type": "text", "text": text}


def turn(who: str, value: str) -> dict:
    return {"from": who, "value": value}


def qa(question="Q", answer="A") -> list[dict]:
    return [turn("human", question), turn("gpt", answer)]


def png(path: Path, color="red", size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(color="blue", size=(5, 7)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_json(path: Path, records) -> Path:
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def good(samples):
    return [s for s in samples if isinstance(s, DataSample)]


def pixels(samples):
    return [spec.load().getpixel((0, 0)) for s in samples for spec in s.images]


TRL_RECORDS = [
    {"messages": [{"role": "user", "content": "<image>What color?"},
                  {"role": "assistant", "content": "Red."}],
     "images": ["a.png"]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [T("Compare"), IMG, IMG]},
                  {"role": "assistant", "content": [T("Same.")]}],
     "images": ["a.png", "sub/b.png"]},
]


def check_trl(samples):
    """The two TRL_RECORDS samples, whatever storage they came through."""
    assert [s.sample_id for s in samples] == ["0", "1"]
    s0, s1 = samples
    assert s0.messages == [{"role": "user", "content": [IMG, T("What color?")]}]
    assert s0.answer == "Red." and len(s0.images) == 1
    assert s1.messages == [{"role": "system", "content": [T("Be brief.")]},
                           {"role": "user", "content": [T("Compare"), IMG, IMG]}]
    assert s1.answer == "Same." and len(s1.images) == 2
    assert pixels(samples) == [RED, RED, GREEN]


# ----------------------------------------------------------------------------- LLaVA JSON

def test_llava_single_turn(tmp_path):
    png(tmp_path / "img" / "coco" / "1.jpg")
    data = write_json(tmp_path / "data.json", [
        {"id": "q1", "image": "coco/1.jpg",
         "conversations": qa("<image>\nWhat is shown?", " Red. ")},
    ])
    [s] = list(read_samples(str(data), image_root=str(tmp_path / "img")))
    assert s.sample_id == "q1" and s.source == "data.json#0"
    assert s.messages == [{"role": "user", "content": [IMG, T("What is shown?")]}]
    assert s.answer == "Red." and s.meta == {}
    assert [i.ref for i in s.images] == ["path:coco/1.jpg"]
    img = s.images[0].load()
    assert img.mode == "RGB" and img.size == (8, 6)


def test_llava_multi_turn_prompts_include_earlier_turns(tmp_path):
    png(tmp_path / "a.png"), png(tmp_path / "b.png", "green")
    data = write_json(tmp_path / "data.json", [
        {"id": "r", "image": ["a.png", "b.png"],
         "conversations": [turn("system", "You see images."), *qa("<image>\nFirst?", "One."),
                           *qa("And this <image> one?", "Two.")]},
    ])
    s0, s1 = read_samples(str(data), image_root=str(tmp_path))
    assert (s0.sample_id, s1.sample_id) == ("r#turn0", "r#turn1")
    assert s0.source == s1.source == "data.json#0"
    assert s0.messages == [{"role": "system", "content": [T("You see images.")]},
                           {"role": "user", "content": [IMG, T("First?")]}]
    assert s0.answer == "One." and [i.ref for i in s0.images] == ["path:a.png"]
    later = [{"role": "assistant", "content": [T("One.")]},
             {"role": "user", "content": [T("And this"), IMG, T("one?")]}]
    assert s1.messages == s0.messages + later
    assert s1.answer == "Two." and [i.ref for i in s1.images] == ["path:a.png", "path:b.png"]
    assert s1.images[1].load().getpixel((0, 0)) == GREEN
    s1.messages[0]["content"].clear()  # prompts are independent copies
    assert s0.messages[0]["content"] == [T("You see images.")]


def test_images_without_placeholder_go_first_in_first_user_turn(tmp_path):
    data = write_json(tmp_path / "data.json", [
        {"id": 5, "image": ["x.png", "y.png"], "conversations": qa("Describe.", "Two cats.")},
    ])
    [s] = read_samples(str(data), image_root=str(tmp_path))
    assert s.sample_id == "5"
    assert s.messages[0]["content"] == [IMG, IMG, T("Describe.")]
    assert [i.ref for i in s.images] == ["path:x.png", "path:y.png"]


def test_text_only_record_and_index_ids(tmp_path):
    data = write_json(tmp_path / "data.json", [
        {"conversations": qa("Say hi.", "Hi.")},
        {"conversations": qa("Say bye.", "Bye.")},
    ])
    samples = list(read_samples(str(data)))  # no image root needed without images
    assert [s.sample_id for s in samples] == ["0", "1"]
    assert samples[1].images == [] and samples[1].answer == "Bye."
    assert samples[1].messages == [{"role": "user", "content": [T("Say bye.")]}]


def test_llava_jsonl(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"id": "a", "conversations": qa()}])
    [s] = read_samples(str(data))
    assert (s.sample_id, s.source, s.answer) == ("a", "d.jsonl#0", "A")


# ----------------------------------------------------------------------------- TRL records

def test_trl_jsonl_paths(tmp_path):
    png(tmp_path / "a.png"), png(tmp_path / "sub" / "b.png", "green")
    data = write_jsonl(tmp_path / "trl.jsonl", TRL_RECORDS)
    samples = list(read_samples(str(data), image_root=str(tmp_path)))
    check_trl(samples)
    assert [i.ref for i in samples[1].images] == ["path:a.png", "path:sub/b.png"]


def embedded_records():
    """TRL_RECORDS with list-of-parts content as Arrow stores it (every part has type and text)
    and the images embedded as {"bytes", "path"} dicts."""
    def u(*parts):
        return [{"type": t, "text": x} for t, x in parts]
    red, green = png_bytes("red"), png_bytes("green")
    return [
        {"messages": [{"role": "user", "content": u(("image", None), ("text", "What color?"))},
                      {"role": "assistant", "content": u(("text", "Red."))}],
         "images": [{"bytes": red, "path": None}]},
        {"messages": [{"role": "system", "content": u(("text", "Be brief."))},
                      {"role": "user", "content": u(("text", "Compare"), ("image", None),
                                                    ("image", None))},
                      {"role": "assistant", "content": u(("text", "Same."))}],
         "images": [{"bytes": red, "path": None}, {"bytes": green, "path": "b.png"}]},
    ]


def test_trl_parquet_with_image_bytes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(embedded_records()), tmp_path / "trl.parquet")
    samples = list(read_samples(str(tmp_path / "trl.parquet")))  # bytes need no image root
    check_trl(samples)
    assert samples[0].images[0].ref == "sha256:" + hashlib.sha256(png_bytes("red")).hexdigest()
    assert samples[1].images[0].ref == samples[0].images[0].ref  # same bytes, same ref


@pytest.mark.parametrize("as_dict", [False, True])
def test_trl_datasets_folder_with_image_feature(tmp_path, as_dict):
    import datasets

    records = embedded_records()
    for r in records:  # hand datasets PIL images; its Image() feature stores them encoded
        r["images"] = [Image.open(io.BytesIO(i["bytes"])) for i in r["images"]]
    part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
    features = datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"),
                                   "content": datasets.List(part)}),
        "images": datasets.List(datasets.Image()),
    })
    ds = datasets.Dataset.from_list(records, features=features)
    folder = tmp_path / "ds"
    (datasets.DatasetDict(train=ds) if as_dict else ds).save_to_disk(str(folder))
    samples = list(read_samples(str(folder)))
    check_trl(samples)
    assert samples[0].source == ("ds:train#0" if as_dict else "ds#0")
    assert all(spec.ref.startswith("sha256:") for s in samples for spec in s.images)
    if as_dict:
        with pytest.raises(DataError, match="no split 'test'"):
            read_samples(str(folder), split="test")


def test_in_memory_pil_images_hash_png_encoding():
    img = Image.new("RGB", (3, 3), "teal")
    [s] = samples_from_records([{"messages": [{"role": "user", "content": "<image>?"},
                                              {"role": "assistant", "content": "teal"}],
                                 "images": [img]}], "mem")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    assert s.images[0].ref == "sha256:" + hashlib.sha256(buf.getvalue()).hexdigest()
    assert s.images[0].load().size == (3, 3) and s.source == "mem#0"


# ----------------------------------------------------------------------------- easy-vqa

def test_easy_vqa_train():
    easy_vqa = pytest.importorskip("easy_vqa")
    questions, answers, _ = easy_vqa.get_train_questions()
    it = read_samples("easy-vqa:train")
    first = [next(it) for _ in range(3)]
    assert [s.sample_id for s in first] == [f"easy-vqa:train:{i}" for i in range(3)]
    assert first[1].source == "easy-vqa:train#1"
    for s, q, a in zip(first, questions, answers):
        assert s.messages == [{"role": "user", "content": [IMG, T(q)]}]
        assert s.answer == a
    # answers rectangle, blue, yes
    assert [s.meta["question_type"] for s in first] == ["shape", "color", "yes/no"]
    assert first[0].images[0].ref == "path:0.png"
    img = first[0].images[0].load()
    assert img.size == (64, 64) and img.mode == "RGB"
    assert os.path.isfile(os.path.join(image_root_for("easy-vqa:train"), "0.png"))
    with pytest.raises(DataError, match="easy-vqa:train or easy-vqa:test"):
        read_samples("easy-vqa:validation")


# ----------------------------------------------------------------------------- image safety

def test_path_traversal_refused(tmp_path):
    root = tmp_path / "root"
    png(root / "ok.png")
    secret = png(tmp_path / "secret.png")
    (root / "link.png").symlink_to(secret)
    (root / "inner.png").symlink_to(root / "ok.png")  # a link staying inside the root is fine
    assert path_image("inner.png", str(root)).load().size == (8, 6)
    for rel in ["../secret.png", str(secret), "link.png", "sub/../../secret.png"]:
        spec = path_image(rel, str(root))
        with pytest.raises(ImageError, match="outside the image root"):
            spec.load()
    with pytest.raises(ImageError, match="--image-root"):
        path_image("ok.png", None).load()


def test_absolute_path_inside_root_becomes_relative(tmp_path):
    png(tmp_path / "d" / "x.png")
    spec = path_image(str(tmp_path / "d" / "x.png"), str(tmp_path))
    assert spec.ref == "path:d/x.png"
    assert spec.load().size == (8, 6)


def test_missing_and_corrupt_images_fail_at_load(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    data = write_json(tmp_path / "data.json", [
        {"id": "m", "image": "missing.png", "conversations": qa("<image>Q")},
        {"id": "c", "image": "bad.png", "conversations": qa("<image>Q")},
    ])
    missing, corrupt = read_samples(str(data), image_root=str(tmp_path))  # opens no image
    with pytest.raises(ImageError, match="not found.*missing.png"):
        missing.images[0].load()
    with pytest.raises(ImageError, match="cannot decode.*bad.png"):
        corrupt.images[0].load()
    truncated = png_bytes(size=(50, 50))[:60]
    [s] = samples_from_records([{"messages": [{"role": "user", "content": "<image>Q"},
                                              {"role": "assistant", "content": "A"}],
                                 "images": [{"bytes": truncated, "path": "trunc.png"}]}], "mem")
    with pytest.raises(ImageError, match="trunc.png"):
        s.images[0].load()


# ----------------------------------------------------------------------------- bad input

def test_unreadable_data_files_raise_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_samples(str(tmp_path / "nope.json"))
    (tmp_path / "broken.json").write_text("[{\"id\": 1,")
    with pytest.raises(DataError, match="broken.json"):
        read_samples(str(tmp_path / "broken.json"))
    (tmp_path / "obj.json").write_text("{\"data\": []}")
    with pytest.raises(DataError, match="list of records"):
        read_samples(str(tmp_path / "obj.json"))
    (tmp_path / "garbage.jsonl").write_bytes(b"\x00\xff binary\n")
    with pytest.raises(DataError, match="garbage.jsonl"):
        read_samples(str(tmp_path / "garbage.jsonl"))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet"):
        read_samples(str(tmp_path / "bad.parquet"))
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a datasets folder"):
        read_samples(str(tmp_path / "folder"))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported"):
        read_samples(str(tmp_path / "x.csv"))


def test_malformed_records_become_bad_samples_and_iteration_goes_on(tmp_path):
    data = write_json(tmp_path / "data.json", [
        {"id": "no-conv"},
        {"id": "no-answer", "conversations": [turn("human", "Q")]},
        {"id": "empty", "conversations": qa("Q", "   ")},
        {"id": "mismatch", "image": ["a.png"], "conversations": qa("<image><image>Q")},
        {"id": "speaker", "conversations": [turn("robot", "Q"), turn("gpt", "A")]},
        {"id": "half", "conversations": qa("Q", "") + qa("Q2", "B")},
        "not a record",
        {"id": "fine", "conversations": qa()},
    ])
    samples = list(read_samples(str(data)))
    bad = {s.sample_id: s.reason for s in samples if isinstance(s, BadSample)}
    assert bad == {
        "no-conv": "record has neither 'conversations' nor 'messages'",
        "no-answer": "no assistant turn",
        "empty": "empty answer",
        "mismatch": "record has 2 image placeholders but 1 images",
        "speaker": "conversations turn 0 has no known 'from' (human, user, gpt, assistant, system)",
        "half#turn0": "empty answer",
        "6": "record is a str, not an object",
    }
    assert all(s.stage == "data" for s in samples if isinstance(s, BadSample))
    assert [(s.sample_id, s.answer) for s in good(samples)] == [("half#turn1", "B"), ("fine", "A")]
    assert len(good(samples)[0].messages) == 3  # the rejected earlier turn is still context


def test_bad_jsonl_line_is_a_bad_sample(tmp_path):
    rec = {"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]}
    (tmp_path / "d.jsonl").write_text(json.dumps(rec) + "\n{oops\n\n" + json.dumps(rec) + "\n")
    samples = list(read_samples(str(tmp_path / "d.jsonl")))
    assert [type(s).__name__ for s in samples] == ["DataSample", "BadSample", "DataSample"]
    assert samples[1].sample_id == "1" and "invalid JSON" in samples[1].reason
    assert samples[2].source == "d.jsonl#2"


def test_ids_unique_and_stable(tmp_path):
    data = write_json(tmp_path / "data.json", [
        {"id": "a", "conversations": qa()},
        {"id": "a", "conversations": qa()},          # repeated id -> a@1
        {"conversations": qa()},                     # index id "2"
        {"id": "2", "conversations": qa() + qa()},   # "2" taken -> 2@3#turn0/1
        {"id": "a#turn1", "conversations": qa()},
        {"id": "a", "conversations": qa() + qa()},   # "a" taken -> a@5#turn0/1
    ])
    first = [s.sample_id for s in read_samples(str(data))]
    assert first == ["a", "a@1", "2", "2@3#turn0", "2@3#turn1", "a#turn1", "a@5#turn0", "a@5#turn1"]
    assert len(set(first)) == len(first)
    assert [s.sample_id for s in read_samples(str(data))] == first
