"""The Recalibrator (docs/method.md): teacher answer features -> student space -> back, through
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
import logging

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.vlm.parts import vlm_parts

from student.layouts import STUDENT, TEACHER, TOKENS  # the spaces of the segments a layout feeds in
logger = logging.getLogger(__name__)


class Recalibrator(nn.Module):
    def __init__(self, layers: nn.ModuleList, rotary: nn.Module, d_student: int, d_teacher: int, eps: float, mrope: bool,
                 layer_types: list[str] | None = None, sliding_window: int | None = None,
                 rotary_per_type: bool = False, chunk_size: int | None = None, block_kind: str = ""):
        super().__init__()
        self.proj_pre = nn.Linear(d_teacher, d_student, bias=False)
        self.layers = layers
        self.rotary = rotary
        self.proj_post = nn.Linear(d_student, d_teacher, bias=False)
        self.norm = nn.RMSNorm(d_teacher, eps=eps)
        self.mrope = mrope
        self.layer_types = list(layer_types or ["full_attention"] * len(layers))
        self.sliding_window = sliding_window
        self.chunk_size = chunk_size
        self.rotary_per_type = rotary_per_type  # Gemma 3: one rotary table per layer type
        self.block_kind = block_kind  # what from_student built, for logs and `student check`
        self.flash = False
        self.gradient_checkpointing = False  # recompute each block in the backward pass (saves activations)

    @classmethod
    def from_student(cls, student, teacher_hidden: int, depth: int = 2, init: str = "copy", seed: int = 0) -> "Recalibrator":
        """Blocks of the student's decoder-layer class and config: copies of its last `depth` attention layers
        (a stack that mixes in conv or state-space blocks skips those), or, when it has fewer than `depth`
        attention layers or no rotary embedding, plain Llama decoder blocks of the student's width; `init`
        random re-draws the copied weights."""
        parts = vlm_parts(student)
        config = parts.text_config
        n_layers = len(parts.layers)
        if depth < 1 or depth > n_layers:
            raise ValueError(f"Recalibrator depth {depth} must be in [1, {n_layers}] (the student's layer count)")
        attention = parts.attention_layer_indices
        if len(attention) >= depth and parts.rotary is not None:
            picked = attention[-depth:]
            layers = nn.ModuleList(copy.deepcopy(parts.layers[i]) for i in picked)
            _run_alone(layers)
            types = [parts.layer_types[i] for i in picked]
            rotary = copy.deepcopy(parts.rotary)
            skipped = n_layers - len(attention)
            kind = (f"copies of the student's last {depth} attention layers ({parts.layer_class.__name__}: "
                    f"{', '.join(types)})" + (f"; {skipped} non-attention blocks skipped" if skipped else ""))
            per_type, mrope = parts.rotary_takes_layer_type, _uses_mrope(config)
        else:
            layers, rotary = plain_blocks(config, depth)
            types, per_type, mrope = ["full_attention"] * depth, False, False
            why = "no rotary embedding" if parts.rotary is None else f"only {len(attention)} attention layers"
            kind = (f"plain LlamaDecoderLayer blocks of width {config.hidden_size} (the student's stack has {why}, "
                    f"depth {depth} asked)")
            if init == "copy":
                init = "random"  # nothing of the student's to copy
        logger.info("Recalibrator for %s: %s", parts.family, kind)
        rec = cls(layers, rotary, config.hidden_size, teacher_hidden, getattr(config, "rms_norm_eps", 1e-6),
                  mrope, types, getattr(config, "sliding_window", None), per_type,
                  getattr(config, "attention_chunk_size", None), kind)
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

    def attach_token_embeddings(self, table: torch.Tensor, seed: int = 0) -> None:
        """For the teacher-tokens layout (student/layouts.py): the teacher's token embeddings [rows, d_teacher]
        (frozen, a buffer outside the state dict: the cache holds them) and `proj_tokens`, their own projection
        into the student's width (a trained weight: embeddings and final hidden states differ in scale)."""
        d_teacher, d_student = self.proj_pre.in_features, self.proj_pre.out_features
        if table.dim() != 2 or table.shape[1] != d_teacher:
            raise ValueError(f"token embeddings of shape {tuple(table.shape)} do not fit a {d_teacher}-wide teacher")
        self.proj_tokens = nn.Linear(d_teacher, d_student, bias=False, device=self.proj_pre.weight.device)
        nn.init.normal_(self.proj_tokens.weight, std=self.proj_pre.weight.std().item() or 0.02,
                        generator=torch.Generator().manual_seed(seed + 1))
        self.register_buffer("token_table", table.detach(), persistent=False)

    def token_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The teacher's embeddings of `ids` [n] -> [n, d_teacher] (attach_token_embeddings first)."""
        if getattr(self, "token_table", None) is None:
            raise ValueError("this Recalibrator has no token embeddings: the teacher-tokens layout attaches them")
        return self.token_table[ids.to(self.token_table.device)]

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
            parts = [self._project(x, space) for x, space in segments]
            sequences.append(torch.cat(parts))
        lengths = [len(s) for s in sequences]
        hidden = nn.utils.rnn.pad_sequence(sequences, batch_first=True)  # right padding: causal attention never sees it
        batch, length = hidden.shape[:2]
        positions = torch.arange(length, device=hidden.device).expand(batch, length)
        rope_positions = positions[None].expand(3, batch, length) if self.mrope else positions
        kinds = sorted(set(self.layer_types))
        if self.rotary_per_type:
            cos_sin = {kind: self.rotary(hidden, rope_positions, kind) for kind in kinds}
        else:
            shared = self.rotary(hidden, rope_positions)
            cos_sin = {kind: shared for kind in kinds}
        masks = {kind: None if self.flash else self._mask(kind, length, hidden.dtype, hidden.device) for kind in kinds}
        for layer, kind in zip(self.layers, self.layer_types):
            kwargs = dict(attention_mask=masks[kind], position_ids=rope_positions, position_embeddings=cos_sin[kind])
            if self.gradient_checkpointing and torch.is_grad_enabled():
                out = checkpoint(layer, hidden, use_reentrant=False, **kwargs)
            else:
                out = layer(hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden, lengths


    def _project(self, x: torch.Tensor, space: str) -> torch.Tensor:
        """A segment in the student's width: teacher features through proj_pre, teacher token embeddings through
        proj_tokens, student features as they are."""
        if space == TEACHER:
            return self.proj_pre(x.float())
        if space == TOKENS:
            return self.proj_tokens(x.float())
        return x.float()

    def _mask(self, kind: str, length: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Additive mask [1, 1, L, L]: causal; sliding layers also drop keys a window or more behind,
        chunked layers keys in an earlier chunk (as the student's own stack masks them)."""
        i = torch.arange(length, device=device)
        allowed = i[None, :] <= i[:, None]
        if kind == "sliding_attention" and self.sliding_window:
            allowed &= i[:, None] - i[None, :] < self.sliding_window
        elif kind == "chunked_attention" and self.chunk_size:
            allowed &= (i[:, None] // self.chunk_size) == (i[None, :] // self.chunk_size)
        mask = torch.zeros(length, length, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask[None, None]


def language_model(student) -> nn.Module:
    """The student's text decoder stack (pipeline/vlm/parts.py finds it)."""
    return vlm_parts(student).decoder


def plain_blocks(config, depth: int) -> tuple[nn.ModuleList, nn.Module]:
    """`depth` Llama decoder blocks and their rotary embedding at the student's width and head layout, for
    stacks the Recalibrator cannot copy from."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    d = config.hidden_size
    heads = getattr(config, "num_attention_heads", None) or max(d // 64, 1)
    plain = LlamaConfig(hidden_size=d, num_attention_heads=heads,
                        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
                        head_dim=getattr(config, "head_dim", None) or d // heads,
                        intermediate_size=getattr(config, "intermediate_size", None) or 4 * d,
                        rms_norm_eps=getattr(config, "rms_norm_eps", 1e-6), num_hidden_layers=depth,
                        max_position_embeddings=getattr(config, "max_position_embeddings", 4096))
    plain._attn_implementation = "sdpa"
    return nn.ModuleList(LlamaDecoderLayer(plain, i) for i in range(depth)), LlamaRotaryEmbedding(plain)


def _run_alone(layers: nn.Module) -> None:
    """Copied blocks run on their own, without the stack around them: a block that shares its keys and values
    with other layers of the stack (Gemma 3n / 4 KV sharing: `store_full_length_kv` writes them for later
    layers, `is_kv_shared_layer` reads another layer's) computes its own instead."""
    for module in layers.modules():
        if getattr(module, "store_full_length_kv", False):
            module.store_full_length_kv = False
        if getattr(module, "is_kv_shared_layer", False) and getattr(module, "k_proj", None) is not None:
            module.is_kv_shared_layer = False


def _uses_mrope(config) -> bool:
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return "mrope_section" in rope


def _reinit(layers: nn.Module, std: float, generator: torch.Generator) -> None:
    for module in layers.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std, generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif "Norm" in type(module).__name__ and getattr(module, "weight", None) is not None:
            nn.init.ones_(module.weight)
