"""Where a loaded VLM keeps its parts: the one place in the project that knows.

    parts = vlm_parts(model)        # VLMParts, or UnsupportedFamily naming what is missing
    parts.layers, parts.norm, parts.rotary, parts.layer_types, parts.head, parts.vision_parameter_names

Everything is found through transformers' own accessors and declarations, not attribute-name lists:
`get_decoder()` (followed while it leads somewhere new, for text models nested under another wrapper),
`get_output_embeddings()`, `get_input_embeddings()`, `config.get_text_config()`, `get_encoder("image")`.
Inside the decoder the layer stack is the module list with `num_hidden_layers` entries; the final norm
is the decoder's own child norm (LFM2 calls it `embedding_norm`); the rotary embedding is the child that
holds an `inv_freq`-style buffer. Stage freezing reads `vision_parameter_names`: the image encoder's
parameters, less the merger that Qwen-style families keep inside it (it maps vision features into the
text width, so it is a projector). Families whose decoder stack cannot be found fail with
`UnsupportedFamily` before any work starts.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field

import torch
from torch import nn

# Layer types (config.layer_types) whose blocks are softmax attention over hidden states; any other
# (conv, mamba, linear_attention, ...) is a block the Recalibrator does not copy (student/recalibrator.py).
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


class UnsupportedFamily(ValueError):
    """A model whose parts cannot be found: the message names the family, what is missing and what works."""


@dataclass
class VLMParts:
    family: str  # config.model_type
    decoder: nn.Module  # the text decoder stack (embeddings, layers, final norm)
    layers: nn.ModuleList
    norm: nn.Module | None  # the final norm (None: the stack ends without one)
    rotary: nn.Module | None  # the rotary embedding (None: no rotary positions)
    text_config: object
    layer_types: list[str]  # one per layer ("full_attention" for stacks that declare none)
    head: nn.Module
    logit_scale: float
    softcap: float | None
    vision_parameter_names: frozenset = field(default_factory=frozenset)  # frozen unless --train-vision-encoder
    projector_parameter_names: frozenset = field(default_factory=frozenset)

    @property
    def layer_class(self) -> type:
        return type(self.layers[0])

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def attention_layer_indices(self) -> list[int]:
        return [i for i, kind in enumerate(self.layer_types) if kind in ATTENTION_LAYER_TYPES]

    @property
    def rotary_takes_layer_type(self) -> bool:
        """Gemma 3 keeps one rotary table per layer type (local and global rope bases)."""
        return self.rotary is not None and "layer_type" in inspect.signature(self.rotary.forward).parameters


def vlm_parts(model) -> VLMParts:
    """The parts of `model` (cached on the model object; a model's structure does not change)."""
    cached = getattr(model, "_genrecal_parts", None)
    if cached is not None:
        return cached
    parts = _find_parts(model)
    object.__setattr__(model, "_genrecal_parts", parts)  # plain attribute, not a registered submodule
    return parts


def _find_parts(model) -> VLMParts:
    family = getattr(model.config, "model_type", type(model).__name__)
    text_config = model.config.get_text_config()
    decoder = text_decoder(model)
    layers = _layer_stack(decoder, text_config)
    if layers is None:
        raise UnsupportedFamily(
            f"{family} ({type(model).__name__}): no decoder layer stack found under get_decoder() "
            f"({type(decoder).__name__}; expected a module list of num_hidden_layers="
            f"{getattr(text_config, 'num_hidden_layers', '?')} blocks). Use a transformers-native checkpoint "
            "(an '-hf' repo) of this family, or a student of a family listed in README 'Supported families'")
    head = model.get_output_embeddings()
    if head is None:
        raise UnsupportedFamily(f"{family} ({type(model).__name__}): get_output_embeddings() is None, so there is no "
                                "language-model head to train or to read logits from; load it with "
                                "AutoModelForImageTextToText (the ...ForConditionalGeneration class)")
    declared = getattr(text_config, "layer_types", None)
    layer_types = list(declared)[: len(layers)] if declared else ["full_attention"] * len(layers)
    # Layers that attend to the image through cross-attention (Mllama) need the vision states to run: for the
    # Recalibrator they are not self-attention blocks, whatever the config's layer_types says.
    layer_types = ["cross_attention" if "CrossAttention" in type(layer).__name__ else kind
                   for layer, kind in zip(layers, layer_types)]
    scale, softcap = logit_transforms(model)
    vision, projector = _vision_and_projector(model, decoder, head)
    return VLMParts(family, decoder, layers, _final_norm(decoder, layers, text_config), _rotary(decoder), text_config,
                    layer_types, head, scale, softcap, vision, projector)


def text_decoder(model) -> nn.Module:
    """`get_decoder()`, followed while it returns a new module (a causal-LM wrapper inside a VLM)."""
    seen = {id(model)}
    current = model
    while hasattr(current, "get_decoder"):
        nxt = current.get_decoder()
        if nxt is None or id(nxt) in seen:
            break
        seen.add(id(nxt))
        current = nxt
    return current


def _layer_stack(decoder: nn.Module, text_config) -> nn.ModuleList | None:
    """The decoder's direct child module list with one block per text layer."""
    count = getattr(text_config, "num_hidden_layers", None)
    lists = [child for child in decoder.children() if isinstance(child, nn.ModuleList) and len(child) > 0]
    exact = [child for child in lists if len(child) == count]
    if exact:
        return exact[0]
    return lists[0] if len(lists) == 1 else None


def _final_norm(decoder: nn.Module, layers: nn.ModuleList, text_config) -> nn.Module | None:
    """The decoder's child norm over the text width (the one after the last block)."""
    width = getattr(text_config, "hidden_size", None)
    embeddings = decoder.get_input_embeddings() if hasattr(decoder, "get_input_embeddings") else None
    for child in decoder.children():
        if child is layers or child is embeddings or isinstance(child, (nn.ModuleList, nn.Embedding)):
            continue
        weight = getattr(child, "weight", None)
        is_norm = isinstance(child, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(child).__name__.lower()
        if is_norm and isinstance(weight, torch.Tensor) and weight.shape == (width,):
            return child
    return None


def _rotary(decoder: nn.Module) -> nn.Module | None:
    for child in decoder.children():
        if any("inv_freq" in name for name, _ in child.named_buffers(recurse=False)):
            return child
    return None


def logit_transforms(model) -> tuple[float, float | None]:
    """(logit_scale, softcap): logits = softcap(head(h) * logit_scale). Reads `logit_scale` (Cohere: multiply),
    `logits_scaling` (Granite: divide) and `final_logit_softcapping` (Gemma 2) from the text config, then the
    top config."""
    configs = [model.config.get_text_config(), model.config]

    def first(attr):
        for cfg in configs:
            value = getattr(cfg, attr, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        return None

    scale = 1.0
    if (value := first("logit_scale")) is not None:
        scale *= value
    if (value := first("logits_scaling")) is not None and value != 0:
        scale /= value
    return scale, first("final_logit_softcapping")


def _vision_and_projector(model, decoder: nn.Module, head: nn.Module) -> tuple[frozenset, frozenset]:
    """(vision-encoder parameter names, projector parameter names), as `model.named_parameters()` spells them."""
    encoder = model.get_encoder(modality="image") if _has_image_encoder(model) else None
    if encoder is None or encoder is model or encoder is decoder:
        return frozenset(), frozenset()
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    inside = {id(p) for p in encoder.parameters()}
    mergers = {id(p) for m in encoder.modules() if "merger" in type(m).__name__.lower() for p in m.parameters()}
    text = {id(p) for p in decoder.parameters()} | {id(p) for p in head.parameters()}
    vision = frozenset(names[i] for i in inside - mergers if i in names)
    projector = frozenset(n for i, n in names.items() if i not in inside - mergers and i not in text)
    return vision, projector


def _has_image_encoder(model) -> bool:
    try:
        return inspect.signature(model.get_encoder).parameters.get("modality") is not None
    except (TypeError, ValueError):
        return False


@functools.cache
def forward_parameters(cls: type) -> tuple[frozenset, bool]:
    """(names `cls.forward` takes, whether it also takes **kwargs)."""
    params = inspect.signature(cls.forward).parameters
    return frozenset(params), any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def model_inputs(model, inputs: dict) -> dict:
    """The processor outputs `model.forward` should receive: `labels` never (the trainer computes its own
    losses; a processor that returns them would make the model compute a second, unused loss), and only the
    keys the forward declares when it takes no **kwargs."""
    names, open_kwargs = forward_parameters(type(model))
    return {k: v for k, v in inputs.items() if k != "labels" and (open_kwargs or k in names)}


def end_of_turn_ids(model, tokenizer, template_ids: list[int]) -> list[int]:
    """The ids that end an assistant turn: what the chat template writes after an answer, else (a template
    that writes nothing after it) the generation config's eos ids, else the tokenizer's eos."""
    if template_ids:
        return list(template_ids)
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None) if model is not None else None
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    if not ids and tokenizer.eos_token_id is not None:
        ids = [tokenizer.eos_token_id]
    return ids


def describe(parts: VLMParts) -> str:
    """One line for logs and `student check`."""
    kinds = sorted(set(parts.layer_types))
    return (f"{parts.family}: {len(parts.layers)} x {parts.layer_class.__name__} ({', '.join(kinds)}), "
            f"norm {type(parts.norm).__name__ if parts.norm is not None else 'none'}, "
            f"rotary {type(parts.rotary).__name__ if parts.rotary is not None else 'none'}")


def body_forward(model, **inputs) -> torch.Tensor:
    """The VLM without its lm_head: final hidden states [batch, seq, d] (after the final norm), from the
    declared base model (`model.base_model`, which every ...ForConditionalGeneration wraps its head around)."""
    return body_forward_with_layers(model, (), **inputs)[0]


def body_forward_with_layers(model, layers, **inputs) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """`body_forward`, plus the hidden states [batch, seq, d] of intermediate `layers` from the same forward.

    Layer l is transformers' `output_hidden_states` index l: `model(..., output_hidden_states=True).hidden_states[l]`
    is the input of decoder layer 0 for l = 0 and, for 1 <= l < num_hidden_layers, the output of decoder block l - 1
    (transformers records it with a forward hook on each block; older code appended it after each block); index
    num_hidden_layers is the final state after the norm, which is what this returns first. So 1 <= l <
    num_hidden_layers, and a forward hook on block l - 1 of `vlm_parts(model).layers` catches exactly that state,
    keeping only the chosen layers (not all of them, as output_hidden_states would: 81 x [batch, seq, 8192] for a
    72B teacher)."""
    for key in ("logits_to_keep", "output_hidden_states", "return_dict"):
        inputs.pop(key, None)
    inputs.setdefault("use_cache", False)
    blocks = vlm_parts(model).layers if layers else []
    bad = [l for l in layers if not 1 <= l < len(blocks)]
    if bad:
        raise ValueError(f"intermediate layers {bad} outside 1..{len(blocks) - 1} ({len(blocks)} decoder layers; "
                         f"{len(blocks)} is the final layer)")
    caught: dict[int, torch.Tensor] = {}

    def catch(layer):
        def hook(module, args, output):
            if layer in caught:
                raise RuntimeError(f"decoder layer {layer - 1} ran twice in one forward; cannot tell which output is "
                                   f"hidden state {layer}")
            caught[layer] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    handles = [blocks[l - 1].register_forward_hook(catch(l)) for l in layers]
    try:
        base = getattr(model, "base_model", model)
        if base is not model:
            out = base(**model_inputs(base, inputs))
            final = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        else:
            final = model(**model_inputs(model, inputs), output_hidden_states=True).hidden_states[-1]
    finally:
        for handle in handles:
            handle.remove()
    missing = [l for l in layers if l not in caught]
    if missing:
        raise RuntimeError(f"decoder layers {[l - 1 for l in missing]} did not run in the forward")
    return final, {l: caught[l] for l in layers}


def scale_and_cap(logits: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """The family's logit scaling, then its tanh soft-cap (the order the families apply them in)."""
    if scale != 1.0:
        logits = logits * scale
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
