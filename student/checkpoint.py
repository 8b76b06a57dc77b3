"""The checkpoint folder of a stage: layout, saving and loading, resume, the FSDP gather and the
Recalibrator's weights.

    OUT/stage{N}/                     stock HF folder: model safetensors, config, processor/tokenizer, chat template
    OUT/stage{N}/<beside>/            what trained beside the student, one folder each (student/methods.py
                                      `Beside.folders`), e.g.:
    OUT/stage{N}/recalibrator/        model.safetensors + recalibrator.json (genrecal stages 1-2)
    OUT/stage{N}/teacher_verbalizers/ model.safetensors + verbalizers.json (--method vlsi stages 1-2; also
    OUT/stage{N}/student_verbalizers/ student/vlsi.py), the teacher's reusable by later runs
    OUT/stage{N}/trainer_state/       optimizer, scheduler position, RNG, data order (for --resume)
    OUT/stage{N}/train_config.json    the resolved configuration
    OUT/stage{N}/config.yaml          the same as a config file: `student train --config` it to rerun the stage
    OUT/stage{N}/metrics.jsonl        one line per optimizer step
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from pipeline import __version__
from pipeline.config_file import config_yaml
from pipeline.run_metrics import METRICS_FILE
from pipeline.vlm.processors import save_processor
from student import distributed

if TYPE_CHECKING:  # annotations only: config.py imports student/methods.py, which imports this module
    from student.config import TrainConfig

RECALIBRATOR_DIR = "recalibrator"
STATE_DIR = "trainer_state"
CONFIG_FILE = "train_config.json"
CONFIG_YAML = "config.yaml"
FINISHED_FILE = "trainer_state/finished.json"
RECALIBRATOR_WEIGHTS = "model.safetensors"


def save_recalibrator(rec, folder: Path) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in rec.state_dict().items()}, str(folder / RECALIBRATOR_WEIGHTS))
    (folder / "recalibrator.json").write_text(json.dumps({
        "depth": len(rec.layers), "layer_class": type(rec.layers[0]).__name__,
        "d_student": rec.proj_pre.out_features, "d_teacher": rec.proj_pre.in_features, "mrope": rec.mrope,
        "token_inputs": hasattr(rec, "proj_tokens"),  # the teacher-tokens layout's projection (student/layouts.py)
    }, indent=2) + "\n")


def load_recalibrator(rec, folder: Path) -> None:
    path = Path(folder) / RECALIBRATOR_WEIGHTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no Recalibrator weights (run stage 1 first)")
    missing, unexpected = rec.load_state_dict(load_file(str(path)), strict=False)
    missing = [k for k in missing if not k.startswith("rotary.")]  # rotary buffers are rebuilt, not trained
    if missing or unexpected:
        raise ValueError(f"{path}: Recalibrator does not match this student (missing {missing}, unexpected {unexpected})")


def stage_dir(cfg: TrainConfig, stage: int | None = None) -> Path:
    return Path(cfg.out) / f"stage{cfg.stage if stage is None else stage}"


def check_not_a_run_folder(model: str) -> None:
    """A run folder (OUT, holding stage1/ stage2/ ...) is not a model: say which stage folder to give."""
    folder = Path(model).expanduser()
    if not folder.is_dir() or (folder / "config.json").exists():
        return
    stages = sorted(p.name for p in folder.glob("stage[0-9]") if (p / "config.json").exists())
    if stages:
        raise FileNotFoundError(f"{model} is a training run folder ({', '.join(stages)}), not a model: "
                                f"pass one of its stages, e.g. --model {folder / stages[-1]}")


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def save_checkpoint(cfg, vlm, parts, optimizer, schedule, step, rank: int, identity: str,
                    folders: dict | None = None) -> None:
    """Write the whole stage folder under a temporary name, then swap it in (a crash keeps the old one).
    Every rank takes part (an FSDP student is gathered); rank 0 writes. `identity`: `source_identity`
    of what the run trains on, checked on --resume. `folders`: more folders beside the model, name ->
    a function writing one (what trains beside the student: student/methods.py `Beside.folders`)."""
    model_state = full_student_state(vlm.model, cfg.fsdp)
    optim_state = optimizer_state(parts, optimizer, cfg.fsdp)
    if rank == 0:
        _write_checkpoint(cfg, vlm, model_state, optim_state, schedule, step, identity, folders or {})
    distributed.barrier()


def _write_checkpoint(cfg, vlm, model_state, optim_state, schedule, step, identity, folders=None) -> None:
    out = stage_dir(cfg)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vlm.model.save_pretrained(tmp, state_dict=model_state)
    save_processor(vlm.processor, tmp)
    for name, write in (folders or {}).items():
        write(tmp / name)
    (tmp / STATE_DIR).mkdir()
    torch.save({"optimizer": optim_state, "scheduler": schedule.state_dict(), "step": step,
                "cache_identity": identity, "fsdp": cfg.fsdp}, tmp / STATE_DIR / "state.pt")
    write_json(tmp / CONFIG_FILE, cfg.to_dict())
    (tmp / CONFIG_YAML).write_text(config_file_text(cfg))
    if (out / METRICS_FILE).exists():
        shutil.copy2(out / METRICS_FILE, tmp / METRICS_FILE)
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def config_file_text(cfg: TrainConfig) -> str:
    """The stage's resolved settings as a `--config` file: every field (defaults too), so it says what ran."""
    header = (f"student train --stage {cfg.stage}: the resolved settings of {stage_dir(cfg)} "
              f"(genrecal {__version__}).\nRerun it with: student train --config {stage_dir(cfg) / CONFIG_YAML} "
              "(flags given there override it)")
    if cfg.sample_ids is not None:  # set from Python only; a file cannot carry it
        header += f"\nTrained on {len(cfg.sample_ids)} listed cache samples (sample_ids), which this file leaves out."
    return config_yaml(cfg, header, skip=frozenset({"sample_ids"}))


def load_resume_state(out: Path, cfg: TrainConfig, identity: str) -> dict | None:
    """The trainer state of the last checkpoint in `out` (None if there is none), after checking that it
    was trained the same way and on the same source (`identity`, see `source_identity`)."""
    path = out / STATE_DIR / "state.pt"
    if not path.exists():
        return None
    state = torch.load(path, weights_only=True)  # never unpickle arbitrary objects
    if state.get("fsdp", False) != cfg.fsdp:
        raise ValueError(f"--resume: {out} was trained {'with' if state.get('fsdp') else 'without'} --fsdp; "
                         "resume it the same way")
    if state["cache_identity"] != identity:
        raise ValueError(
            f"--resume: {cfg.cache} is not the cache this run started with (teacher or settings differ: "
            f"{state['cache_identity']} vs {identity}); use a new --out"
        )
    return state


def source_identity(cfg: TrainConfig, manifest) -> str:
    """What the run trains on: the cache's teacher and settings (from its `manifest`, None with --data),
    or the data source and its limit."""
    what = {"data": cfg.data, "limit": cfg.data_limit} if cfg.data else manifest.identity()
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def full_student_state(student, sharded: bool) -> dict | None:
    """The full state dict of a sharded student on rank 0 (None on other ranks; every rank must call)."""
    if not sharded:
        return None
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if dist.get_rank() == 0 else None


def optimizer_state(model_parts, optimizer, sharded: bool) -> dict:
    """The optimizer state as a plain dict; for FSDP, gathered in full (every rank must call)."""
    if not sharded:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model_parts, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model_parts, optimizer, state: dict, sharded: bool) -> None:
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model_parts, optimizer, state,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
