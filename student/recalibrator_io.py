"""Save and load Recalibrator weights (safetensors, never pickle)."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"


def save_recalibrator(rec, folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in rec.state_dict().items()}, str(folder / WEIGHTS))
    (folder / "recalibrator.json").write_text(json.dumps({
        "depth": len(rec.layers), "layer_class": type(rec.layers[0]).__name__,
        "d_student": rec.proj_pre.out_features, "d_teacher": rec.proj_pre.in_features, "mrope": rec.mrope,
    }, indent=2) + "\n")


def load_recalibrator(rec, folder: Path) -> None:
    path = Path(folder) / WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no Recalibrator weights (run stage 1 first)")
    missing, unexpected = rec.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in missing if not k.startswith("rotary.")]  # rotary buffers are rebuilt, not trained
    if missing or unexpected:
        raise ValueError(f"{path}: Recalibrator does not match this student (missing {missing}, unexpected {unexpected})")
