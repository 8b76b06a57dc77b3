"""VLsI (Verbalized Layers-to-Interactions, arXiv 2412.01822) from the teacher cache: the verbalizers, their
files, the choice of student layers and the order-preserving layer matching. The losses are in
student/vlsi_step.py; `student train --method vlsi --stage 1|2|3` runs them as student/methods.py declares VLsI.

VLsI needs the student to share the teacher's tokenizer (student/tokenizer_match.py checks it). A verbalizer
per chosen layer turns that layer's hidden state into a distribution over the shared vocabulary through the
side's own frozen head; the cache's intermediate teacher layers (`dump-teacher --layers`) are all the teacher
side needs, so the teacher model is never loaded:

1. stage 1: the teacher's verbalizers learn from the cached layer features (CE through the cache's teacher
   head against the teacher's answer ids), the student's on the frozen student (CE through its head
   against its answer ids). Both backbones are frozen.
2. stage 2: each chosen student layer, in order, is matched to a cached teacher layer (`match_layers`) and
   pulled towards it by KL(teacher verbalized || student verbalized); plus the last-layer KL and the student's
   CE. The student trains (all but its vision encoder, unless --train-vision-encoder) with its verbalizers; the
   teacher's stay frozen. The paper trains the student with LoRA; here it is a full update, as in every other
   method of this project (GenRecal's stage 2, KD, ULD, SFT), so that one cache compares them like for like, and
   because peft is not a dependency. LoRA through peft is left as an option for later.
3. stage 3: plain SFT of the student (the stage-3 path every method shares).

Layer indices are transformers' `output_hidden_states` indices on both sides: hidden_states[l] for
1 <= l < the model's depth is the output of decoder block l - 1, before the final norm.

    OUT/stage{1,2}/teacher_verbalizers/   model.safetensors + verbalizers.json (reusable: --teacher-verbalizers)
    OUT/stage{1,2}/student_verbalizers/   model.safetensors + verbalizers.json
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

TEACHER_VERBALIZERS_DIR = "teacher_verbalizers"
STUDENT_VERBALIZERS_DIR = "student_verbalizers"
WEIGHTS = "model.safetensors"
META = "verbalizers.json"
FORM = "rmsnorm-gated-ffn-residual-v1"


class Verbalizer(nn.Module):
    """r = x_n + W_o(silu(W_g x_n) * (W_u x_n)), x_n = RMSNorm(x) with a learned weight: a gated FFN d -> d with
    no expansion, whose output goes through the side's own frozen head.

    Why this form: an intermediate hidden state is the raw residual stream, whose scale grows with depth, while
    the head expects what the final norm makes of it; hence the RMSNorm first. W_o starts at zero, so a new
    verbalizer is exactly the head on the normalised state (the "logit lens"), already a distribution that
    predicts something for mid-to-late layers, and training starts from there instead of from a random map
    (the gated branch then learns the correction, as a LoRA's zero-initialised B does). The norm weight starts at
    ones on both sides: the cache holds no teacher final norm to copy, and the two sides are built alike.
    """

    def __init__(self, d: int, generator: torch.Generator | None = None, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.norm = nn.Parameter(torch.ones(d))
        self.gate = nn.Linear(d, d, bias=False)
        self.up = nn.Linear(d, d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        bound = d ** -0.5  # nn.Linear's default (kaiming uniform, a=sqrt(5)) from a generator of our own
        with torch.no_grad():
            for linear in (self.gate, self.up):
                linear.weight.uniform_(-bound, bound, generator=generator)
            self.out.weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.norm
        return xn + self.out(nn.functional.silu(self.gate(xn)) * self.up(xn))


class Verbalizers(nn.Module):
    """One side's verbalizers, one per layer (hidden_states index), in increasing layer order."""

    def __init__(self, side: str, layers: tuple[int, ...], hidden_size: int, seed: int = 0, source: dict | None = None):
        super().__init__()
        if side not in ("teacher", "student"):
            raise ValueError(f"side must be teacher or student, not {side!r}")
        self.side, self.layers, self.hidden_size = side, tuple(layers), hidden_size
        self.source = source or {}  # what the layers are of (the cache's teacher), checked when loaded
        self.by_layer = nn.ModuleDict({
            str(layer): Verbalizer(hidden_size, torch.Generator().manual_seed(_seed(seed, side, layer)))
            for layer in self.layers})

    def __getitem__(self, layer: int) -> Verbalizer:
        return self.by_layer[str(layer)]

    def meta(self) -> dict:
        return {"form": FORM, "side": self.side, "layers": list(self.layers), "hidden_size": self.hidden_size,
                "source": self.source}

    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(folder / WEIGHTS))
        (folder / META).write_text(json.dumps(self.meta(), indent=2) + "\n")

    def load(self, folder: Path) -> "Verbalizers":
        """Load the weights of `folder` after checking that they are verbalizers of these layers, this width and
        (for the teacher) this teacher; returns self."""
        folder = Path(folder)
        if not (folder / WEIGHTS).exists() or not (folder / META).exists():
            raise FileNotFoundError(f"{folder}: no {self.side} verbalizers ({WEIGHTS} + {META}); run "
                                    "`student train --method vlsi --stage 1` first")
        meta = json.loads((folder / META).read_text())
        diffs = [f"{k}: the folder has {meta.get(k)!r}, this run needs {v!r}" for k, v in self.meta().items()
                 if k != "source" and meta.get(k) != v]
        diffs += [f"source.{k}: the folder has {meta.get('source', {}).get(k)!r}, this run's is {v!r}"
                  for k, v in self.source.items() if meta.get("source", {}).get(k) != v]
        if diffs:
            raise ValueError(f"{folder}: these {self.side} verbalizers do not fit this run:\n  " + "\n  ".join(diffs))
        self.load_state_dict(load_file(str(folder / WEIGHTS)))
        return self


def teacher_source(manifest) -> dict:
    """What teacher verbalizers are of: the cache's teacher as its manifest records it (model as given to the
    dump, dtype, sizes, tokenizer, ...; all but the chat template). A verbalizer depends on the teacher's layers
    and head, not on the data, so another cache of that teacher may reuse it; a dump that named the same weights
    otherwise (another path or alias) records another model and is refused, since the manifest cannot tell them
    apart from other weights."""
    fields = {k: v for k, v in dataclasses.asdict(manifest.teacher).items() if k != "chat_template"}
    return json.loads(json.dumps(fields))  # as it reads back from verbalizers.json (tuples become lists)


def parse_layers(text: str) -> tuple[int, ...]:
    """--student-layers '4,8,12' -> (4, 8, 12); increasing positive integers, else ValueError."""
    try:
        layers = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"--student-layers {text!r}: give comma-separated layer indices, e.g. 4,8,12") from None
    if not layers or layers[0] < 1 or any(b <= a for a, b in zip(layers, layers[1:])):
        raise ValueError(f"--student-layers {text!r}: the layer indices must be positive and increasing")
    return layers


def default_student_layers(depth: int, count: int) -> tuple[int, ...]:
    """`count` layers evenly spaced over a student of `depth` decoder layers (1 .. depth - 1; fewer when the
    student is too shallow): layer round((k + 1) * depth / (count + 1)) for k < count."""
    picks = {min(max(int((k + 1) * depth / (count + 1) + 0.5), 1), depth - 1) for k in range(count)}
    return tuple(sorted(p for p in picks if p >= 1))


def student_layers(spec: tuple[int, ...] | None, depth: int, teacher_layers: tuple[int, ...]) -> tuple[int, ...]:
    """The student layers that get verbalizers: `spec` (checked against the student's depth) or the default."""
    if depth < 2:
        raise ValueError(f"the student has {depth} decoder layer(s): VLsI needs an intermediate layer (depth >= 2)")
    if spec is None:
        return default_student_layers(depth, len(teacher_layers))
    bad = [layer for layer in spec if not 1 <= layer < depth]
    if bad:
        raise ValueError(f"--student-layers {','.join(map(str, spec))}: layers {bad} are outside 1..{depth - 1} "
                         f"(the student has {depth} decoder layers; {depth} is its final layer, which the last-layer "
                         "KL covers)")
    return tuple(spec)


def match_layers(kl: Callable[[int, int], float], n_student: int, n_teacher: int, window: int) -> list[int]:
    """The adaptive, order-preserving layer matching: for student layer i = 0, 1, ... in order, the teacher layer j
    (positions in the cached layer list) of smallest kl(i, j) among the `window` teacher layers right after the
    previous match (for i = 0: the first `window`). The window is cut at the last teacher layer; once a student
    layer has matched the last one, the later ones stay there. Matches therefore never go backwards. Ties go to
    the shallower teacher layer. `kl` is only asked about candidates."""
    matches, previous = [], -1
    for i in range(n_student):
        first = min(previous + 1, n_teacher - 1)
        last = min(previous + window, n_teacher - 1)
        candidates = range(first, max(first, last) + 1)
        previous = min(candidates, key=lambda j: (kl(i, j), j))
        matches.append(previous)
    return matches


def _seed(seed: int, side: str, layer: int) -> int:
    """One initialisation stream per (run seed, side, layer): a verbalizer starts the same whatever else is built."""
    return (seed * 1_000_003 + (0 if side == "teacher" else 500_009) + layer) % (2**63)
