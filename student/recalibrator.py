"""The Recalibrator (METHOD.md section 2): teacher answer features -> student space -> back, through
decoder blocks of the student's own kind, so the frozen teacher head can read the result.

    rec = Recalibrator.from_student(student_model, teacher_hidden=8192, depth=2, init="copy")
    outs = rec([[(z_qs, "student"), (z_al, "teacher")], ...], out_lengths=[n, ...])   # per sample [n, d_teacher]

Each sample is one sequence: its segments are concatenated (teacher segments go through
Proj-pre first), positions are reassigned 0..L-1 and a fresh rotary embedding of the student's
kind is applied ("NPE"; for M-RoPE students the same position in every section). Attention is
causal. The outputs at the last positions (how many is the caller's choice, see student/step.py
for the layouts) go through Proj-post and a final RMSNorm in the
teacher's width (the teacher head expects post-norm features).
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

STUDENT, TEACHER = "student", "teacher"


class Recalibrator(nn.Module):
    def __init__(self, layers: nn.ModuleList, rotary: nn.Module, d_student: int, d_teacher: int, eps: float, mrope: bool):
        super().__init__()
        self.proj_pre = nn.Linear(d_teacher, d_student, bias=False)
        self.layers = layers
        self.rotary = rotary
        self.proj_post = nn.Linear(d_student, d_teacher, bias=False)
        self.norm = nn.RMSNorm(d_teacher, eps=eps)
        self.mrope = mrope
        self.flash = False
        self.gradient_checkpointing = False  # recompute each block in the backward pass (saves activations)

    @classmethod
    def from_student(cls, student, teacher_hidden: int, depth: int = 2, init: str = "copy", seed: int = 0) -> "Recalibrator":
        """Blocks of the student's decoder-layer class and config: copies of its last `depth` layers, or random."""
        lm = language_model(student)
        config = lm.config
        if depth < 1 or depth > len(lm.layers):
            raise ValueError(f"Recalibrator depth {depth} must be in [1, {len(lm.layers)}] (the student's layer count)")
        layers = nn.ModuleList(copy.deepcopy(layer) for layer in lm.layers[-depth:])
        rec = cls(layers, copy.deepcopy(lm.rotary_emb), config.hidden_size, teacher_hidden,
                  getattr(config, "rms_norm_eps", 1e-6), _uses_mrope(config))
        rec.flash = str(getattr(config, "_attn_implementation", "")).startswith("flash")
        generator = torch.Generator().manual_seed(seed)
        std = getattr(config, "initializer_range", 0.02)
        for proj in (rec.proj_pre, rec.proj_post):
            nn.init.normal_(proj.weight, std=std, generator=generator)
        if init == "random":
            _reinit(rec.layers, std, generator)
        elif init != "copy":
            raise ValueError(f"unknown Recalibrator init {init!r}; choose copy or random")
        return rec.float()

    def forward(self, samples: list[list[tuple[torch.Tensor, str]]], out_lengths: list[int] | None = None) -> list[torch.Tensor]:
        """For each sample, the output [k, d_teacher] at its last k positions: k = `out_lengths[i]`, by
        default the length of its last segment."""
        hidden, lengths = self._blocks(samples)
        if out_lengths is None:
            out_lengths = [len(segments[-1][0]) for segments in samples]
        return [self.norm(self.proj_post(hidden[i, n - k : n])) for i, (n, k) in enumerate(zip(lengths, out_lengths))]

    def _blocks(self, samples):
        """(hidden [B, L, d_student] after the blocks, sequence lengths)."""
        sequences = []
        for segments in samples:
            parts = [self.proj_pre(x.float()) if space == TEACHER else x.float() for x, space in segments]
            sequences.append(torch.cat(parts))
        lengths = [len(s) for s in sequences]
        hidden = nn.utils.rnn.pad_sequence(sequences, batch_first=True)  # right padding: causal attention never sees it
        batch, length = hidden.shape[:2]
        positions = torch.arange(length, device=hidden.device).expand(batch, length)
        rope_positions = positions[None].expand(3, batch, length) if self.mrope else positions
        cos_sin = self.rotary(hidden, rope_positions)
        mask = None if self.flash else _causal_mask(length, hidden.dtype, hidden.device)
        for layer in self.layers:
            kwargs = dict(attention_mask=mask, position_ids=rope_positions, position_embeddings=cos_sin)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                out = checkpoint(layer, hidden, use_reentrant=False, **kwargs)
            else:
                out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden, lengths


def language_model(student) -> nn.Module:
    """The decoder stack (with .layers, .norm, .rotary_emb) inside a transformers VLM."""
    inner = getattr(student, "model", student)
    lm = getattr(inner, "language_model", inner)
    if not hasattr(lm, "layers") or not hasattr(lm, "rotary_emb"):
        raise ValueError(f"cannot find the decoder layers of {type(student).__name__}")
    return lm


def _uses_mrope(config) -> bool:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return "mrope_section" in rope


def _causal_mask(length: int, dtype: torch.dtype, device) -> torch.Tensor:
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


def _reinit(layers: nn.Module, std: float, generator: torch.Generator) -> None:
    for module in layers.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
