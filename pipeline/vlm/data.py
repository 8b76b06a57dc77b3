"""Data readers for `pipeline dump-teacher`: a data set as prompt/answer samples.

    for s in read_samples("llava.json", image_root="/data/coco"):   # or .jsonl/.parquet/folder
        if isinstance(s, BadSample):                    # malformed record: reject it, go on
            rejects.append((s.sample_id, s.source, s.stage, s.reason)); continue
        images = [spec.load() for spec in s.images]    # RGB PIL; ImageError -> reject, go on
        ...  # s.messages (prompt turns), s.answer, [spec.ref for spec in s.images]

Sources: LLaVA records (`.json` list or `.jsonl`: `{"id", "image": path | [paths], "conversations":
[{"from": human|gpt|system, "value": "<image>\n..."}]}`); TRL records (`{"messages": [{"role",
"content": str | [parts]}], "images": [paths | {"bytes", "path"} | PIL]}`) from `.jsonl`, `.parquet`
or a `save_to_disk` folder (`split` picks from a DatasetDict, default "train"); `easy-vqa:train` /
`easy-vqa:test` (refs relative to the package's images folder, see `image_root_for`); `scenes:train` /
`scenes:test` (generated scenes with multi-token answers and their ground truth, pipeline/vlm/scenes.py).

Every assistant turn is a target: its prompt is all earlier turns (earlier answers included) and
it carries the images placed in them. `<image>` marks image places (text pieces are stripped); a
record with images but no placeholder gets them first in its first user turn. Answers are stripped.

Sample ids, unique within a source and the same on every read of the same file: the base id is
the record's `id` (str or int), else its 0-based index; a base already taken by an earlier record
(or whose ids would collide) gets `@<record index>` appended ("a" again at index 7 -> "a@7"). One
target: the base id; k > 1 targets: `<base>#turn<j>`, j = 0-based index among assistant turns. A
record unusable as a whole yields one BadSample with the base id; an unusable target (e.g. empty
answer) one with its target id. easy-vqa: `easy-vqa:<split>:<question index>`. `source` is
`<file name>#<record index>` (`<folder>:<split>#<i>` for a DatasetDict split).

A missing or unparsable source raises `DataError` at once; images are only opened by `load()`.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from PIL import Image

from pipeline.vlm.images import ImageError, ImageSpec, bytes_image, path_image, pil_image
from pipeline.vlm.scenes import SPLITS as SCENE_SPLITS, is_scenes, scene_png, scene_record, scene_split

__all__ = ["BadSample", "DataError", "DataSample", "ImageError", "ImageSpec", "image_root_for",
           "read_samples", "samples_from_records"]

PLACEHOLDER = "<image>"
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
               "system": "system"}
TRL_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}
EASY_VQA_COLORS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}
_BATCH = 64


class DataError(ValueError):
    """A data source is missing or cannot be read at all; the message names it and the fix."""


@dataclass
class DataSample:
    """One target: prompt turns (chat format, list-of-parts content), its images and answer."""

    sample_id: str
    source: str
    messages: list[dict]
    images: list[ImageSpec]
    answer: str | None
    meta: dict = field(default_factory=dict)


@dataclass
class BadSample:
    """A record (or one target of it) that cannot be used; the caller records it as a reject."""

    sample_id: str
    source: str
    stage: str
    reason: str


class _Bad(Exception):
    """Internal: why a record or target is unusable."""


def read_samples(source: str, image_root: str | None = None,
                 split: str | None = None) -> Iterator[DataSample | BadSample]:
    """Samples of `source` (see the module docstring); raises DataError now if it is unreadable."""
    if _is_easy_vqa(source):
        return _easy_vqa(source, image_root, split)
    if is_scenes(source):
        return _scenes(source, split)
    path = Path(source)
    if not path.exists():
        raise DataError(f"data source {source} does not exist: pass a .json/.jsonl/.parquet file, "
                        "a datasets folder saved with save_to_disk, easy-vqa:<train|test> or scenes:<train|test>")
    if path.is_dir():
        name, records = _datasets_records(path, split)
    elif path.suffix == ".json":
        name, records = path.name, _json_records(path)
    elif path.suffix == ".jsonl":
        name, records = path.name, _jsonl_records(path)
    elif path.suffix == ".parquet":
        name, records = path.name, _parquet_records(path)
    else:
        raise DataError(f"data source {source}: unsupported file type {path.suffix!r}; "
                        "use .json, .jsonl, .parquet, a datasets folder or easy-vqa:<split>")
    return samples_from_records(records, name, image_root)


def image_root_for(source: str, image_root: str | None = None,
                   split: str | None = None) -> str | None:
    """The folder `path:` refs of `source` are relative to (the manifest's data.image_root):
    `image_root`, or for easy-vqa when it is None, the package's images folder."""
    if image_root is not None or not _is_easy_vqa(source):
        return image_root
    easy_vqa, split = _easy_vqa_module(source, split)
    return os.path.join(os.path.dirname(easy_vqa.__file__), "data", split, "images")


def samples_from_records(records: Iterable[Any], name: str,
                         image_root: str | None = None) -> Iterator[DataSample | BadSample]:
    """Samples of in-memory LLaVA or TRL records; `name` prefixes each `source`."""
    seen: set[str] = set()
    for index, record in enumerate(records):
        source = f"{name}#{index}"
        base = _record_base(record, index)
        try:
            targets = _record_targets(record, image_root)
        except _Bad as bad:
            yield BadSample(_claim_ids(base, index, 1, seen)[0], source, "data", str(bad))
            continue
        ids = _claim_ids(base, index, len(targets), seen)
        for sample_id, (messages, images, answer) in zip(ids, targets):
            if isinstance(answer, _Bad):
                yield BadSample(sample_id, source, "data", str(answer))
            else:
                yield DataSample(sample_id, source, messages, images, answer, {})


def _record_base(record: Any, index: int) -> str:
    rid = record.get("id") if isinstance(record, dict) else None
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or rid == "":
        return str(index)
    return str(rid)


def _target_ids(base: str, n: int) -> list[str]:
    return [base] if n <= 1 else [f"{base}#turn{j}" for j in range(n)]


def _claim_ids(base: str, index: int, n: int, seen: set[str]) -> list[str]:
    """Ids for a record's n targets, made unique against `seen` by appending `@<index>`."""
    ids = _target_ids(base, n)
    while base in seen or any(i in seen for i in ids):
        base = f"{base}@{index}"
        ids = _target_ids(base, n)
    seen.add(base)
    seen.update(ids)
    return ids


def _record_targets(record: Any, image_root: str | None) -> list[tuple[list, list, Any]]:
    """(prompt, images, answer or _Bad) per assistant turn; raises _Bad for an unusable record."""
    if isinstance(record, _Bad):
        raise record
    if not isinstance(record, dict):
        raise _Bad(f"record is a {type(record).__name__}, not an object")
    turns = _turns(record)
    images = _image_specs(record.get("images", record.get("image")), image_root)
    _place_images(turns, len(images))
    return _targets(turns, images)


def _turns(record: dict) -> list[dict]:
    """The record's turns as {"role", "content": [parts]}, from LLaVA or TRL form."""
    if "conversations" in record:
        key, role_key, text_key, roles = "conversations", "from", "value", LLAVA_ROLES
    elif "messages" in record:
        key, role_key, text_key, roles = "messages", "role", "content", TRL_ROLES
    else:
        raise _Bad("record has neither 'conversations' nor 'messages'")
    if not isinstance(record[key], list):
        raise _Bad(f"{key!r} is not a list")
    turns = []
    for k, turn in enumerate(record[key]):
        if not isinstance(turn, dict) or turn.get(role_key) not in roles:
            raise _Bad(f"{key} turn {k} has no known {role_key!r} ({', '.join(roles)})")
        content = _content_parts(turn.get(text_key), k)
        turns.append({"role": roles[turn[role_key]], "content": content})
    return turns


def _split_placeholders(text: str) -> list[dict]:
    """'<image>\\nWhat?' -> [{"type": "image"}, {"type": "text", "text": "What?"}]."""
    parts: list[dict] = []
    for j, piece in enumerate(text.split(PLACEHOLDER)):
        if j > 0:
            parts.append({"type": "image"})
        if piece.strip():
            parts.append({"type": "text", "text": piece.strip()})
    return parts


def _content_parts(content: Any, k: int) -> list[dict]:
    """Normalise a TRL message content (str, list of parts, None) to list-of-parts form."""
    if content is None:
        return []
    if isinstance(content, str):
        return _split_placeholders(content)
    if not isinstance(content, list):
        raise _Bad(f"turn {k} content is a {type(content).__name__}")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text":
            parts.append({"type": "text", "text": part.get("text") or ""})
        else:
            raise _Bad(f"turn {k} has an unsupported content part {kind!r} (text and image only)")
    return parts


def _image_specs(raw: Any, image_root: str | None) -> list[ImageSpec]:
    """ImageSpecs for a record's images (paths, {"bytes", "path"} dicts, PIL images)."""
    if raw is None:
        return []
    items = raw if isinstance(raw, (list, tuple)) else [raw]
    specs = []
    for k, item in enumerate(items):
        if isinstance(item, str):
            specs.append(path_image(item, image_root))
        elif isinstance(item, dict) and isinstance(item.get("bytes"), (bytes, bytearray)):
            specs.append(bytes_image(bytes(item["bytes"]), item.get("path")))
        elif isinstance(item, dict) and isinstance(item.get("path"), str):
            specs.append(path_image(item["path"], image_root))
        elif isinstance(item, Image.Image):
            try:
                specs.append(pil_image(item))
            except Exception as exc:
                raise _Bad(f"image {k} cannot be encoded: {exc}") from None
        else:
            raise _Bad(f"image {k} is a {type(item).__name__}, not a path, bytes dict or PIL image")
    return specs


def _count_images(turns: list[dict]) -> int:
    return sum(p["type"] == "image" for t in turns for p in t["content"])


def _place_images(turns: list[dict], n_images: int) -> None:
    """Check placeholders against images; with none, put all images first in the first user turn."""
    placed = _count_images(turns)
    if placed == n_images:
        return
    if placed == 0:
        user = next((t for t in turns if t["role"] == "user"), None)
        if user is None:
            raise _Bad(f"record has {n_images} images but no user turn to put them in")
        user["content"][:0] = [{"type": "image"} for _ in range(n_images)]
        return
    raise _Bad(f"record has {placed} image placeholders but {n_images} images")


def _targets(turns: list[dict], images: list[ImageSpec]) -> list[tuple[list, list, Any]]:
    targets = []
    for i, turn in enumerate(turns):
        if turn["role"] != "assistant":
            continue
        prompt = turns[:i]
        answer: Any = " ".join(p["text"] for p in turn["content"] if p["type"] == "text").strip()
        if _count_images([turn]):
            answer = _Bad("answer turn contains an image")
        elif not any(t["role"] == "user" for t in prompt):
            answer = _Bad("no user turn before the answer")
        elif not answer:
            answer = _Bad("empty answer")
        targets.append((copy.deepcopy(prompt), images[:_count_images(prompt)], answer))
    if not targets:
        raise _Bad("no assistant turn")
    return targets


def _json_records(path: Path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as JSON ({exc}); fix the file, or name it .jsonl if "
                        "it holds one record per line") from None
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__}; expected a list of records "
                        "(LLaVA format: [{\"id\", \"image\", \"conversations\"}, ...])")
    return data


def _jsonl_records(path: Path) -> Iterator[Any]:
    """Records of a JSON-lines file. The first record is checked now (DataError if it is not a
    JSON object); a later unparsable line comes back as a `_Bad` marker (rejected, goes on)."""
    try:
        with open(path, "rb") as f:
            first = next((line for line in f if line.strip()), b"{}")
        if not isinstance(json.loads(first), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as JSON lines ({exc} on the first line); "
                        "expected one JSON object per line") from None
    return _jsonl_lines(path)


def _jsonl_lines(path: Path) -> Iterator[Any]:
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                try:
                    yield json.loads(line)
                except ValueError as exc:
                    yield _Bad(f"invalid JSON line: {exc}")


def _parquet_records(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"cannot read {path} as Parquet ({exc}); re-export the file") from None
    return _rows(pf.iter_batches(batch_size=_BATCH))


def _rows(batches: Iterable[Any]) -> Iterator[dict]:
    """Python rows of Arrow batches/tables; images stay {"bytes", "path"} structs."""
    for batch in batches:
        yield from batch.to_pylist()


def _datasets_records(path: Path, split: str | None) -> tuple[str, Iterator[dict]]:
    """Rows of a `save_to_disk` folder as raw Arrow rows (images stay encoded bytes)."""
    import datasets

    markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any((path / f).exists() for f in markers):
        raise DataError(f"{path} is a folder but not a datasets folder (no dataset_info.json, "
                        "state.json or dataset_dict.json); save it with Dataset.save_to_disk")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"cannot load datasets folder {path} ({exc})") from None
    name = path.name
    if isinstance(ds, datasets.DatasetDict):
        split = split or "train"
        if split not in ds:
            raise DataError(f"{path} has no split {split!r}; pass one of {sorted(ds)}")
        ds, name = ds[split], f"{path.name}:{split}"
    return name, _rows(ds.with_format("arrow").iter(batch_size=_BATCH))


def _is_easy_vqa(source: str) -> bool:
    return source == "easy-vqa" or source.startswith("easy-vqa:")


def _easy_vqa_module(source: str, split: str | None):
    """(easy_vqa module, split) for "easy-vqa[:<split>]"; DataError on a bad split or no package."""
    named = source.partition(":")[2]
    split = named or split or "train"
    if split not in ("train", "test"):
        raise DataError(f"unknown built-in source {source!r}; use easy-vqa:train or easy-vqa:test")
    try:
        import easy_vqa
    except ImportError:
        raise DataError("easy-vqa sources need the package: pip install easy-vqa") from None
    return easy_vqa, split


def _question_type(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "color" if answer in EASY_VQA_COLORS else "shape"


def _easy_vqa(source: str, image_root: str | None, split: str | None) -> Iterator[DataSample]:
    """easy-vqa questions: one user turn (image, question), the one-word answer."""
    root = image_root_for(source, image_root, split)
    easy_vqa, split = _easy_vqa_module(source, split)
    questions, answers, image_ids = getattr(easy_vqa, f"get_{split}_questions")()
    paths = getattr(easy_vqa, f"get_{split}_image_paths")()

    def samples() -> Iterator[DataSample]:
        for i, (question, answer, image_id) in enumerate(zip(questions, answers, image_ids)):
            file_name = os.path.basename(paths.get(image_id, f"{image_id}.png"))
            content = [{"type": "image"}, {"type": "text", "text": question}]
            yield DataSample(f"easy-vqa:{split}:{i}", f"easy-vqa:{split}#{i}",
                             [{"role": "user", "content": content}], [path_image(file_name, root)],
                             answer, {"question_type": _question_type(answer)})
    return samples()


def _scenes(source: str, split: str | None) -> Iterator[DataSample]:
    """Generated scenes (pipeline/vlm/scenes.py): one user turn (image, question), the reference answer, and the
    scene and the question's truth in meta; the image is a sha256 reference to its PNG."""
    name = scene_split(source, split)
    if name is None:
        raise DataError(f"unknown built-in source {source!r}; use scenes:train or scenes:test")

    def samples() -> Iterator[DataSample]:
        for i in range(SCENE_SPLITS[name]):
            record = scene_record(name, i)
            content = [{"type": "image"}, {"type": "text", "text": record["question"]}]
            meta = {"question_type": record["question_type"], "scene": record["objects"], "truth": record["truth"]}
            yield DataSample(f"scenes:{name}:{i}", f"scenes:{name}#{i}", [{"role": "user", "content": content}],
                             [bytes_image(scene_png(record["objects"]), f"scenes:{name}:{i}")], record["answer"], meta)
    return samples()
