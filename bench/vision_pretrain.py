"""Pretrain a tiny Qwen2-VL's vision tower + merger on easy-VQA image labels, before the teacher's SFT.

    from bench.vision_pretrain import pretrain_vision
    folder = pretrain_vision("runs/t/init", "runs/t/vision-pretrained", samples=20000, steps=400)

Why: trained from scratch inside the VLM, the tower's image tokens stay nearly the same for every image
(the light background fills most patches) and the SFT learns the answer priors instead (see
bench/results/teacher_recipe.md). Real VLMs start from a pretrained vision encoder; this is the tiny
version of that: the image tokens of the tower + merger are mean-pooled and two linear heads predict the
image's colour and shape, read from the answers of the first `samples` easy-VQA train questions (only
those; the held-out questions' images are never seen). The heads are thrown away; the rest of the model
is unchanged and the result is a stock HF folder (`student train --student FOLDER` reads it).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

COLORS = ("red", "green", "blue", "black", "gray", "teal", "brown", "yellow")
SHAPES = ("circle", "rectangle", "triangle")


def image_labels(stop: int, start: int = 0) -> dict[str, dict]:
    """image ref -> {"spec": ImageSpec, "color": index or None, "shape": index or None} from easy-VQA train
    questions start..stop-1 (colour questions name the colour, shape questions the shape)."""
    from pipeline.vlm.data import read_samples

    labels: dict[str, dict] = {}
    for i, s in zip(range(stop), read_samples("easy-vqa:train")):
        if i < start:
            continue
        spec = s.images[0]
        entry = labels.setdefault(spec.ref, {"spec": spec, "color": None, "shape": None})
        if s.meta["question_type"] == "color":
            entry["color"] = COLORS.index(s.answer)
        elif s.meta["question_type"] == "shape":
            entry["shape"] = SHAPES.index(s.answer)
    return {ref: e for ref, e in labels.items() if e["color"] is not None or e["shape"] is not None}


def _pooled_image_tokens(model, processor, images) -> torch.Tensor:
    """[images, hidden]: the mean of each image's tokens as the language model receives them."""
    inputs = processor.image_processor(images=images, return_tensors="pt")
    out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
    tokens = out.pooler_output if hasattr(out, "pooler_output") else out  # merger output
    return tokens.view(len(images), -1, tokens.shape[-1]).mean(1)


def _masked_ce(logits: torch.Tensor, targets: list) -> torch.Tensor:
    keep = [i for i, t in enumerate(targets) if t is not None]
    if not keep:
        return logits.sum() * 0
    return F.cross_entropy(logits[keep], torch.tensor([targets[i] for i in keep]))


@torch.no_grad()
def probe_accuracy(model, processor, heads, labels: list[dict]) -> dict[str, float]:
    """Accuracy of the probe heads on `labels` (a diagnostic: the SFT never sees the heads)."""
    pooled = _pooled_image_tokens(model, processor, [e["spec"].load() for e in labels])
    result = {}
    for k in ("color", "shape"):
        keep = [i for i, e in enumerate(labels) if e[k] is not None]
        guess = heads[k](pooled[keep]).argmax(1)
        result[k] = float((guess == torch.tensor([labels[i][k] for i in keep])).float().mean())
    return result


def pretrain_vision(init: str | Path, out: str | Path, samples: int, steps: int, lr: float = 1e-3, seed: int = 0,
                    batch_size: int = 32, log=print, held_out: tuple[int, int] | None = (30000, 30500)) -> Path:
    """Fit the vision tower + merger of the model in `init`; write the whole model to `out`; return `out`.
    `held_out`: train questions whose images score the probe at the end (log only)."""
    """Fit the vision tower + merger of the model in `init`; write the whole model to `out`; return `out`."""
    from pipeline.vlm.models import load_vlm

    vlm = load_vlm(str(init), device="cpu")
    model = vlm.model
    if not hasattr(model.model, "visual"):
        raise ValueError(f"{init}: vision pretraining knows the Qwen2-VL layout (model.visual) only")
    labels = list(image_labels(samples).values())
    images = [e["spec"].load() for e in labels]
    hidden = model.config.text_config.hidden_size
    torch.manual_seed(seed)
    heads = torch.nn.ModuleDict({"color": torch.nn.Linear(hidden, len(COLORS)),
                                 "shape": torch.nn.Linear(hidden, len(SHAPES))})
    params = list(model.model.visual.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    rng = random.Random(seed)
    model.train()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        batch = rng.sample(range(len(labels)), batch_size)
        pooled = _pooled_image_tokens(model, vlm.processor, [images[i] for i in batch])
        loss = sum(_masked_ce(heads[k](pooled), [labels[i][k] for i in batch]) for k in ("color", "shape"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps:
            log(f"vision pretraining step {step}/{steps}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    if held_out:
        model.eval()
        scores = probe_accuracy(model, vlm.processor, heads, list(image_labels(held_out[1], held_out[0]).values()))
        log(f"vision probe on the held-out questions' images: colour {scores['color']:.3f}, shape {scores['shape']:.3f}")
    out = Path(out)
    shutil.copytree(init, out, dirs_exist_ok=True)  # tokenizer and processor files
    model.eval().save_pretrained(out)
    return out
