"""`scenes:train` / `scenes:test`: a built-in VQA source whose answers are several tokens long and have structure.

    from pipeline.vlm.data import read_samples        # (data.py turns scene_record into DataSamples)
    for sample in read_samples("scenes:train"):        # DataSample: one user turn (image, question) + answer
        sample.meta["question_type"], sample.meta["scene"]   # "describe", [{"shape": "circle", ...}, ...]
    score_answer("large blue square at center, small red circle at top left", sample.meta)   # 0..1

Each record is a new scene drawn with PIL from its own seed (no download): 2-4 objects on a 3 x 3 grid of a
64 x 64 image, each with a shape (circle, square, triangle), a colour (red, green, blue, yellow) and a size
(small, large), at most one object per cell. The train split draws scene i from the seed "scenes:train:i",
the test split from "scenes:test:i": the two streams never share a seed. Question types (record i asks
type i % 4):
- describe: "Describe every object." -> every object as "<size> <colour> <shape> at <position>", joined by
  ", " in a random order (any order is correct: the scorer matches objects, not text);
- count: "How many red objects are there?" -> "two red objects" (a colour, shape or size; zero too);
- attribute: "What color is the large square?" -> "blue" (the object named by two other attributes);
- relation: "Where is the red circle relative to the blue square?" -> "above left" (above/below, then
  left/right, each left out where the two share a row or column).
Every record carries its scene and the question's truth in `meta`, so `score_answer` can judge any wording or
order: order-insensitive object-level F1 for descriptions, exact match of the parsed value for the others.
"""

from __future__ import annotations

import io
import random
import re
from typing import Iterator

from PIL import Image, ImageDraw

SPLITS = {"train": 20000, "test": 1000}  # records per split
IMAGE_SIZE = 64
GRID = 3
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 200, 30)}
SIZES = {"small": 0.22, "large": 0.42}  # radius as a share of a cell's side
ROWS, COLS = ("top", "middle", "bottom"), ("left", "center", "right")
QUESTION_TYPES = ("describe", "count", "attribute", "relation")
NUMBERS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def is_scenes(source: str) -> bool:
    return source == "scenes" or source.startswith("scenes:")


def position_name(row: int, col: int) -> str:
    """'top left', ..., 'center' for the middle cell."""
    if (row, col) == (1, 1):
        return "center"
    return f"{ROWS[row]} {COLS[col]}" if row != 1 else f"middle {COLS[col]}"


def draw_scene(objects: list[dict]) -> Image.Image:
    """The scene as a 64 x 64 RGB image on white."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), "white")
    pen = ImageDraw.Draw(image)
    cell = IMAGE_SIZE / GRID
    for obj in objects:
        cx, cy, r = (obj["col"] + 0.5) * cell, (obj["row"] + 0.5) * cell, SIZES[obj["size"]] * cell
        color = COLORS[obj["color"]]
        if obj["shape"] == "circle":
            pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
        elif obj["shape"] == "square":
            pen.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
        else:
            pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return image


def random_scene(rng: random.Random) -> list[dict]:
    """2-4 objects in distinct cells, no two with the same size, colour and shape."""
    cells = rng.sample(range(GRID * GRID), rng.randint(2, 4))
    objects, seen = [], set()
    for cell in cells:
        while True:
            kind = (rng.choice(list(SIZES)), rng.choice(list(COLORS)), rng.choice(SHAPES))
            if kind not in seen:
                break
        seen.add(kind)
        objects.append({"size": kind[0], "color": kind[1], "shape": kind[2], "row": cell // GRID, "col": cell % GRID})
    return objects


def describe(obj: dict) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']} at {position_name(obj['row'], obj['col'])}"


def _name(obj: dict, objects: list[dict]) -> str:
    """The shortest of 'colour shape' / 'size colour shape' that names `obj` alone in the scene."""
    if sum(o["color"] == obj["color"] and o["shape"] == obj["shape"] for o in objects) == 1:
        return f"{obj['color']} {obj['shape']}"
    return f"{obj['size']} {obj['color']} {obj['shape']}"


def _relation(a: dict, b: dict) -> str:
    vertical = "above" if a["row"] < b["row"] else "below" if a["row"] > b["row"] else ""
    horizontal = "left" if a["col"] < b["col"] else "right" if a["col"] > b["col"] else ""
    return " ".join(w for w in (vertical, horizontal) if w)


def make_question(kind: str, objects: list[dict], rng: random.Random) -> tuple[str, str, dict]:
    """(question, reference answer, truth) of type `kind` about the scene."""
    if kind == "describe":
        order = rng.sample(objects, len(objects))
        return "Describe every object.", ", ".join(describe(o) for o in order), {}
    if kind == "count":
        attribute = rng.choice(("color", "shape", "size"))
        value = rng.choice({"color": list(COLORS), "shape": SHAPES, "size": list(SIZES)}[attribute])
        n = sum(o[attribute] == value for o in objects)
        noun = f"{value} objects" if attribute != "shape" else f"{value}s"
        singular = f"{value} object" if attribute != "shape" else value
        question = f"How many {noun} are there?"
        return question, f"{NUMBERS[n]} {singular if n == 1 else noun}", {"count": n}
    if kind == "attribute":
        for attribute in rng.sample(("color", "shape", "size"), 3):
            others = [a for a in ("size", "color", "shape") if a != attribute]
            candidates = [o for o in objects if sum(all(p[x] == o[x] for x in others) for p in objects) == 1]
            if candidates:
                obj = rng.choice(candidates)
                label = " ".join(obj[x] for x in others) + (" object" if attribute == "shape" else "")
                asked = {"color": "What color is", "shape": "What shape is", "size": "What size is"}[attribute]
                return f"{asked} the {label}?", obj[attribute], {"attribute": attribute, "value": obj[attribute]}
    a, b = rng.sample(objects, 2)  # relation (also the fallback: any scene has two objects)
    question = f"Where is the {_name(a, objects)} relative to the {_name(b, objects)}?"
    answer = _relation(a, b)
    return question, answer, {"relation": answer}


def scene_record(split: str, index: int) -> dict:
    """Record `index` of `split`: {"objects", "question_type", "question", "answer", "truth", "image"}."""
    rng = random.Random(f"scenes:{split}:{index}")
    objects = random_scene(rng)
    kind = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    question, answer, truth = make_question(kind, objects, rng)
    return {"objects": objects, "question_type": kind, "question": question, "answer": answer, "truth": truth}


def cell_contents(objects: list[dict]) -> tuple[list[str], list[str]]:
    """(what each of the GRID x GRID cells holds, "empty" or "<size> <colour> <shape>"; every possible content)."""
    contents = ["empty"] * (GRID * GRID)
    for obj in objects:
        contents[obj["row"] * GRID + obj["col"]] = f"{obj['size']} {obj['color']} {obj['shape']}"
    classes = ["empty"] + [f"{size} {color} {shape}" for size in SIZES for color in COLORS for shape in SHAPES]
    return contents, classes


def scene_split(source: str, split: str | None = None) -> str | None:
    """The split of "scenes:<split>" (None when it is not one of SPLITS)."""
    name = source.partition(":")[2] or split or "train"
    return name if name in SPLITS else None


def scene_png(objects: list[dict]) -> bytes:
    buffer = io.BytesIO()
    draw_scene(objects).save(buffer, format="PNG")
    return buffer.getvalue()


# -- scoring ---------------------------------------------------------------------------------------------------


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", str(text).lower()).split()


def parse_objects(text: str) -> list[dict]:
    """Objects named in a description: each comma/semicolon/'and'-separated chunk with its attribute words."""
    objects = []
    for chunk in re.split(r",|;|\band\b|\n", str(text).lower()):
        words = _words(chunk)
        obj = {"size": _first(words, SIZES), "color": _first(words, COLORS), "shape": _first(words, SHAPES),
               "position": _position(words)}
        if any(obj.values()):
            objects.append(obj)
    return objects


def _first(words: list[str], vocabulary) -> str | None:
    singular = [w[:-1] if w.endswith("s") and w[:-1] in vocabulary else w for w in words]
    return next((w for w in singular if w in vocabulary), None)


def _position(words: list[str]) -> str | None:
    row = next((w for w in words if w in ROWS), None)
    col = next((w for w in words if w in COLS), None)
    if row is None and col == "center":
        return "center"
    if row is None or col is None:
        return None
    return "center" if (row, col) == ("middle", "center") else f"{row} {col}"


def description_f1(prediction: str, objects: list[dict]) -> float:
    """Order-insensitive object-level F1: a predicted object counts when size, colour, shape and position all
    match a true object not matched yet."""
    truth = [{"size": o["size"], "color": o["color"], "shape": o["shape"],
              "position": position_name(o["row"], o["col"])} for o in objects]
    predicted = parse_objects(prediction)
    if not predicted or not truth:
        return 0.0
    left, hits = list(truth), 0
    for obj in predicted:
        if obj in left:
            left.remove(obj)
            hits += 1
    return 2 * hits / (len(predicted) + len(truth))


def _number(words: list[str]) -> int | None:
    for w in words:
        if w.isdigit():
            return int(w)
        if w in NUMBERS:
            return NUMBERS.index(w)
        if w in ("zero", "none"):
            return 0
    return None


def score_answer(prediction: str, meta: dict) -> float:
    """Score in [0, 1] of `prediction` for a scenes record's `meta` (see the module docstring)."""
    kind, truth, words = meta["question_type"], meta.get("truth", {}), _words(prediction)
    if kind == "describe":
        return description_f1(prediction, meta["scene"])
    if kind == "count":
        return float(_number(words) == truth["count"])
    if kind == "attribute":
        vocabulary = {"color": COLORS, "shape": SHAPES, "size": SIZES}[truth["attribute"]]
        named = {_first([w], vocabulary) for w in words} - {None}
        return float(named == {truth["value"]})
    vertical = [w for w in words if w in ("above", "below")]
    horizontal = [w for w in words if w in ("left", "right")]
    return float(" ".join(vertical + horizontal) == truth["relation"])
