"""Pretrain a VLM's vision path (encoder + projector) on image labels read from a data source's answers.

    pipeline pretrain-vision --model runs/t/init --data easy-vqa:train --limit 20000 --steps 1000 --out runs/t/vpre

    from pipeline.vlm.vision_pretrain import pretrain_vision
    pretrain_vision("runs/t/init", "runs/t/vpre", data="easy-vqa:train", limit=20000, steps=1000)

Why: a vision tower trained from scratch inside a VLM gives image tokens that barely differ between images
(on easy-VQA the light background fills most patches), and SFT then learns the answer priors of the question
words instead of looking (bench/results/teacher_recipe.md). Real VLMs start from a pretrained vision encoder;
this is the small version of that step, for models built from config.

How: the image tokens as the language model receives them (`model.get_image_features`, so any family that
transformers ships with that accessor) are mean-pooled, and one linear head per question type predicts the
answer of that type's questions about the image. Types are the samples' `meta["question_type"]`; yes/no
questions are left out (their answer depends on the question, not on the image alone). Scenes records
(`scenes:train`) are labelled from their ground truth instead: what each of the nine cells holds ("empty" or
"<size> <colour> <shape>"), one head per cell that attention-pools the tokens (see `ProbeHead`). The heads are thrown
away; the result is the whole model as a stock HF folder in `out` (`student train --student OUT` reads it).
"""

from __future__ import annotations

import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["ImageLabels", "ProbeHead", "image_labels", "pretrain_vision", "probe_accuracy"]

OPEN_TYPES_EXCLUDED = ("yes/no",)


@dataclass
class ImageLabels:
    """Per image: its spec (loads the image) and, per question type, the index of its answer."""

    images: list = field(default_factory=list)
    targets: list[dict[str, int]] = field(default_factory=list)
    classes: dict[str, list[str]] = field(default_factory=dict)
    """question type -> its answers, in first-seen order (the head's classes)."""


def image_labels(data: str, skip: int = 0, limit: int | None = None, image_root: str | None = None,
                 classes: dict[str, list[str]] | None = None) -> ImageLabels:
    """Labels from the data source's records skip..skip+limit-1 (single-image samples with a question type).
    `classes`: reuse another call's classes (held-out labels); answers outside them are dropped."""
    from pipeline.vlm.data import BadSample, DataError, read_samples

    fixed = classes is not None
    labels = ImageLabels(classes={k: list(v) for k, v in (classes or {}).items()})
    by_ref: dict[str, int] = {}
    for i, s in enumerate(read_samples(data, image_root)):
        if limit is not None and i >= skip + limit:
            break
        if i < skip or isinstance(s, BadSample) or len(s.images) != 1:
            continue
        if "scene" in s.meta:  # scenes: what each cell holds, from the ground truth (every record labels all cells)
            _add_scene(labels, by_ref, s)
            continue
        kind = s.meta.get("question_type")
        if kind is None or kind in OPEN_TYPES_EXCLUDED:
            continue
        answers = labels.classes.setdefault(kind, []) if not fixed else labels.classes.get(kind)
        if answers is None or (fixed and s.answer not in answers):
            continue
        if s.answer not in answers:
            answers.append(s.answer)
        ref = s.images[0].ref
        if ref not in by_ref:
            by_ref[ref] = len(labels.images)
            labels.images.append(s.images[0])
            labels.targets.append({})
        labels.targets[by_ref[ref]][kind] = answers.index(s.answer)
    if not labels.images:
        raise DataError(f"{data}: no single-image samples with a meta question_type (other than yes/no) in "
                         f"records {skip}..{'' if limit is None else skip + limit - 1}; vision pretraining needs "
                         "them as labels")
    return labels


def _add_scene(labels: ImageLabels, by_ref: dict, sample) -> None:
    """Label `sample`'s image with every cell's content ("empty" or "<size> <colour> <shape>"), kinds cell0..8."""
    from pipeline.vlm.scenes import cell_contents

    ref = sample.images[0].ref
    if ref in by_ref:
        return
    by_ref[ref] = len(labels.images)
    labels.images.append(sample.images[0])
    contents, classes = cell_contents(sample.meta["scene"])
    for cell in range(len(contents)):
        labels.classes.setdefault(f"cell{cell}", list(classes))
    labels.targets.append({f"cell{cell}": classes.index(content) for cell, content in enumerate(contents)})


def image_tokens(model, processor, images) -> list[torch.Tensor]:
    """Per image, its tokens [n, hidden] as the language model receives them."""
    inputs = processor.image_processor(images=images, return_tensors="pt")
    out = model.get_image_features(**inputs)
    tokens = out.pooler_output if hasattr(out, "pooler_output") else out
    return [t.reshape(-1, t.shape[-1]) for t in tokens]


def pooled_image_tokens(model, processor, images) -> torch.Tensor:
    """[images, hidden]: the mean of each image's tokens as the language model receives them."""
    return torch.stack([t.mean(0) for t in image_tokens(model, processor, images)])


class ProbeHead(torch.nn.Module):
    """A linear classifier over an image's tokens: mean-pooled, or for a label tied to a place in the image (a
    scenes cell) attention-pooled with a learned query (zero at first: the mean), so that the encoder must
    carry which cell holds what, not only what is somewhere."""

    def __init__(self, width: int, classes: int, attend: bool):
        super().__init__()
        self.query = torch.nn.Parameter(torch.zeros(width)) if attend else None
        self.linear = torch.nn.Linear(width, classes)

    def forward(self, tokens: list[torch.Tensor]) -> torch.Tensor:
        if self.query is None:
            return self.linear(torch.stack([t.mean(0) for t in tokens]))
        pooled = [torch.softmax(t @ self.query / t.shape[-1] ** 0.5, 0) @ t for t in tokens]
        return self.linear(torch.stack(pooled))


def probe_heads(labels: ImageLabels, width: int) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({k: ProbeHead(width, len(v), attend=k.startswith("cell"))
                                for k, v in labels.classes.items()})


def _loss(heads, tokens: list[torch.Tensor], targets: list[dict[str, int]]) -> torch.Tensor:
    total = sum(t.sum() for t in tokens) * 0
    for kind, head in heads.items():
        keep = [i for i, t in enumerate(targets) if kind in t]
        if keep:
            logits = head([tokens[i] for i in keep])
            total = total + F.cross_entropy(logits, torch.tensor([targets[i][kind] for i in keep]))
    return total


@torch.no_grad()
def probe_accuracy(model, processor, heads, labels: ImageLabels, batch_size: int = 64) -> dict[str, float]:
    """Per question type, the accuracy of the probe heads on `labels` (a diagnostic: the heads are discarded)."""
    tokens = [t for i in range(0, len(labels.images), batch_size)
              for t in image_tokens(model, processor, [s.load() for s in labels.images[i:i + batch_size]])]
    result = {}
    for kind, head in heads.items():
        keep = [i for i, t in enumerate(labels.targets) if kind in t]
        if keep:
            guess = head([tokens[i] for i in keep]).argmax(1)
            result[kind] = float((guess == torch.tensor([labels.targets[i][kind] for i in keep])).float().mean())
    cells = [v for k, v in result.items() if k.startswith("cell")]
    if cells:  # scenes: one figure for the nine cells (each holds "empty" or one object)
        result["cells"] = sum(cells) / len(cells)
    return result


def pretrain_vision(model: str | Path, out: str | Path, data: str, limit: int | None = None, skip: int = 0,
                    steps: int = 1000, lr: float = 2e-3, batch_size: int = 32, seed: int = 0,
                    image_root: str | None = None, held_out: tuple[int, int] | None = None, log=print) -> Path:
    """Fit the vision path of the model in folder `model` on the labels of `data` records skip..skip+limit-1;
    write the whole model to `out` and return it. `held_out`: (skip, limit) of records whose images score the
    probe at the end (logged only)."""
    from pipeline.vlm.models import load_vlm

    vlm = load_vlm(str(model), device="cpu")
    if not hasattr(vlm.model, "get_image_features"):
        raise ValueError(f"{model}: {type(vlm.model).__name__} has no get_image_features; vision pretraining "
                         "needs transformers' image-feature accessor")
    labels = image_labels(data, skip, limit, image_root)
    images = [s.load() for s in labels.images]
    torch.manual_seed(seed)
    width = pooled_image_tokens(vlm.model, vlm.processor, images[:1]).shape[-1]
    heads = probe_heads(labels, width)
    # every parameter is handed over; only the vision path gets gradients, and AdamW skips the rest
    optimizer = torch.optim.AdamW(list(vlm.model.parameters()) + list(heads.parameters()), lr=lr)
    rng = random.Random(seed)
    vlm.model.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = [rng.randrange(len(images)) for _ in range(batch_size)]
        tokens = image_tokens(vlm.model, vlm.processor, [images[i] for i in batch])
        loss = _loss(heads, tokens, [labels.targets[i] for i in batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step in (1, steps):
            log(f"vision pretraining step {step}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    vlm.model.eval()
    if held_out:
        scores = probe_accuracy(vlm.model, vlm.processor, heads,
                                image_labels(data, held_out[0], held_out[1], image_root, labels.classes))
        log("vision probe on held-out images: " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    out = Path(out)
    shutil.copytree(model, out, dirs_exist_ok=True)  # tokenizer, processor and template files
    vlm.model.save_pretrained(out)
    return out
