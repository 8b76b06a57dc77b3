"""Load any vision-language model (teacher or student) through stock transformers classes.

`load_vlm(name)` accepts an alias from `MODEL_ALIASES`, a local folder or a hub id and returns the
model (eval mode), its processor and tokenizer. The helpers split a loaded VLM into the pieces the
method needs: `body_forward` (final hidden states, after the final norm), `lm_head_and_scaling` (the
head plus any logit scale / soft-cap the family applies) and `end_of_turn_ids`.

Processors come from pipeline/vlm/processors.py, which works without torchvision.
"""

from __future__ import annotations

import functools
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from transformers.utils import logging as hf_logging

from pipeline.vlm.parts import body_forward, logit_transforms, scale_and_cap, vlm_parts  # noqa: F401 - re-exported
from pipeline.vlm.parts import end_of_turn_ids as model_end_of_turn
from pipeline.vlm.processors import ModelLoadError, load_processor

# InternVL 2.5: only the MPO checkpoints were published in transformers-native ("-hf") form, e.g.
# OpenGVLab/InternVL2_5-{2B,8B,78B}-MPO-hf (LLaMA-Factory registers 2B/8B; issue #7880 confirms 78B);
# the other sizes follow the same naming. The plain SFT repos (OpenGVLab/InternVL2_5-8B) need
# trust_remote_code and are not used by default.
MODEL_ALIASES: dict[str, str] = {
    **{f"qwen2-vl-{s}b": f"Qwen/Qwen2-VL-{s}B-Instruct" for s in (2, 7, 72)},
    **{f"qwen2.5-vl-{s}b": f"Qwen/Qwen2.5-VL-{s}B-Instruct" for s in (3, 7, 32, 72)},
    **{f"internvl2.5-{s}b": f"OpenGVLab/InternVL2_5-{s}B-MPO-hf" for s in (1, 2, 4, 8, 26, 38, 78)},
    **{f"internvl3-{s}b": f"OpenGVLab/InternVL3-{s}B-hf" for s in (1, 2, 8, 14, 38, 78)},
    **{f"llava-onevision-{s}b": f"llava-hf/llava-onevision-qwen2-{s}b-ov-hf" for s in ("0.5", 7, 72)},
}

# This project reports its own progress (pipeline/progress.py); transformers' per-file "Loading weights" and
# "Writing model shards" bars would add two raw-escape lines to the log for every model loaded or saved.
hf_logging.disable_progress_bar()

_DTYPES = {
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
    "float": torch.float32, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


@dataclass
class LoadedVLM:
    model: Any  # AutoModelForImageTextToText instance, eval mode
    processor: Any
    tokenizer: Any
    name: str  # what the caller asked for
    path: str  # local folder or hub id it resolved to
    family: str  # config.model_type, e.g. "qwen2_vl", "internvl", "llava"
    dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def chat_template(self) -> str | None:
        return getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)

    @functools.cached_property
    def end_of_turn(self) -> list[int]:
        """What the chat template writes after an assistant answer, in order (see `end_of_turn_ids`); for a
        template that writes nothing after it, the generation config's eos ids (see parts.end_of_turn_ids)."""
        return model_end_of_turn(self.model, self.tokenizer, template_end_of_turn(self.tokenizer, self.chat_template))

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer, self.end_of_turn)


def tokenizer_of(processor):
    """The tokenizer inside a processor (a bare tokenizer is its own)."""
    return getattr(processor, "tokenizer", processor)


def pad_token_id(tokenizer, end_of_turn: list[int]) -> int:
    """The tokenizer's pad id, or else the first end-of-turn id (padding is masked out either way)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn[0]


def pick_device(name: str = "auto") -> str:
    """auto: this process's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def resolve_model(name: str | os.PathLike) -> str:
    """Alias -> hub id; existing local folder -> its absolute path; anything else is returned as given."""
    text = str(name)
    if text.lower() in MODEL_ALIASES:
        return MODEL_ALIASES[text.lower()]
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path.resolve())
    return text


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep != "/" and os.sep in text


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _check_source(name: str, path: str, revision: str | None, trust_remote_code: bool):
    """Fail at once, with what to do, when `path` cannot be loaded; else (config, local_files_only)."""
    from transformers import AutoConfig

    local_only = False
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(f"model {name!r}: folder {path} has no config.json (not a saved HF model folder)")
    elif _looks_like_path(path):
        raise ModelLoadError(f"model {name!r}: {path} is not an existing local folder; check the path")
    elif "/" not in path:
        raise ModelLoadError(
            f"model {name!r} is not a known alias ({', '.join(sorted(MODEL_ALIASES))}), not a local folder "
            "and not a hub id of the form owner/name"
        )
    else:
        from huggingface_hub import try_to_load_from_cache

        cached = isinstance(try_to_load_from_cache(path, "config.json", revision=revision), str)
        local_only = not _hub_reachable()  # cached but hub down: read the cache, no retries against the network
        if not cached and local_only:
            raise ModelLoadError(
                f"model {name!r} ({path}) is not a local folder and not in the Hugging Face cache, and the hub "
                "cannot be reached (offline?): download it on a connected machine and pass the folder, or point "
                "HF_HOME at a cache that holds it"
            )
    try:
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code,
                                            local_files_only=local_only)
        return config, local_only
    except (OSError, ValueError, KeyError) as exc:
        hint = " (it needs trust_remote_code=True; prefer a transformers-native '-hf' repo)" if (
            "trust_remote_code" in str(exc)) else ""
        raise ModelLoadError(f"model {name!r} ({path}) cannot be loaded{hint}: {exc}") from exc


def _resolve_dtype(dtype, device: str, device_map) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        on_cuda = str(device).startswith("cuda") or (device_map is not None and torch.cuda.is_available())
        return torch.bfloat16 if on_cuda else torch.float32
    if str(dtype) in _DTYPES:
        return _DTYPES[str(dtype)]
    raise ModelLoadError(f"dtype {dtype!r} not understood: use 'auto', 'bfloat16', 'float32' or 'float16'")


def _pick_attention(device: str, dtype: torch.dtype, device_map) -> str:
    on_cuda = str(device).startswith("cuda") or (device_map is not None and torch.cuda.is_available())
    if on_cuda and dtype in (torch.bfloat16, torch.float16):
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_vlm(
    name: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "auto",
    device: str = "cpu",
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
) -> LoadedVLM:
    """Load a VLM and its processor. dtype 'auto' = bf16 on CUDA, fp32 on CPU. With `device_map`, accelerate
    places the weights and `device` is ignored. Attention: flash_attention_2 when importable on CUDA, else sdpa."""
    from transformers import AutoModelForImageTextToText

    path = resolve_model(name)
    config, local_only = _check_source(str(name), path, revision, trust_remote_code)
    torch_dtype = _resolve_dtype(dtype, device, device_map)
    attn = attn_implementation or _pick_attention(device, torch_dtype, device_map)
    kwargs = dict(dtype=torch_dtype, revision=revision, trust_remote_code=trust_remote_code,
                  local_files_only=local_only)
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        try:
            model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation=attn, **kwargs)
        except ValueError as exc:  # a vision tower without sdpa / flash-attn support: fall back to eager
            if attn_implementation is not None or "attn" not in str(exc).lower():
                raise
            model = AutoModelForImageTextToText.from_pretrained(path, attn_implementation="eager", **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {name!r} ({path}) cannot be loaded: {exc}") from exc
    if device_map is None:
        model.to(device)
    model.eval()
    vlm_parts(model)  # a family whose decoder or head cannot be found fails here, before any work
    processor = load_processor(path, trust_remote_code=trust_remote_code, revision=revision,
                               local_files_only=local_only)
    tokenizer = tokenizer_of(processor)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        warnings.warn(f"{name}: tokenizer has {len(tokenizer)} tokens but the embedding only {rows} rows")
    return LoadedVLM(model, processor, tokenizer, str(name), path, config.model_type, torch_dtype)


def decoder_layer_count(name: str | os.PathLike, *, revision: str | None = None, trust_remote_code: bool = False) -> int:
    """Decoder layers of a VLM's text stack as `vlm_parts` finds them, without loading weights: the model is built
    from its config on the meta device (seconds even for a 72B model), so a dump can check `--layers` first."""
    from transformers import AutoModelForImageTextToText

    path = resolve_model(name)
    config, _ = _check_source(str(name), path, revision, trust_remote_code)
    try:
        with torch.device("meta"):
            skeleton = AutoModelForImageTextToText.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model {name!r} ({path}) cannot be built from its config: {exc}") from exc
    return len(vlm_parts(skeleton).layers)


# ----------------------------------------------------------------------------------------------------
# Body / head split


def lm_head_and_scaling(model) -> tuple[torch.nn.Module, float, float | None]:
    """(lm_head, logit_scale, softcap): logits = softcap(lm_head(h) * logit_scale), with
    softcap(x) = tanh(x / c) * c when c is not None (pipeline/vlm/parts.py finds them)."""
    return model.get_output_embeddings(), *logit_transforms(model)


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states, with the family's scale and soft-cap (== model(...).logits)."""
    head, scale, softcap = lm_head_and_scaling(model)
    return scale_and_cap(head(hidden), scale, softcap)


# ----------------------------------------------------------------------------------------------------
# Chat template


def end_of_turn_ids(tokenizer, chat_template: str | None = None) -> list[int]:
    """Special token ids the chat template writes right after an assistant message (e.g. [<|im_end|>] for
    ChatML, [</s>] for Mistral/Llama-2 [INST] templates); [eos_token_id] when it writes none."""
    ids = template_end_of_turn(tokenizer, chat_template)
    return ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def template_end_of_turn(tokenizer, chat_template: str | None = None) -> list[int]:
    """Special token ids the chat template writes right after an assistant message; [] when it writes none."""
    template = chat_template if chat_template is not None else getattr(tokenizer, "chat_template", None)
    sentinel = "Zq9xSENTINELx9qZ"
    suffix = None
    if template:
        for content in ([{"type": "text", "text": sentinel}], sentinel):
            messages = [
                {"role": "user", "content": [{"type": "text", "text": "hi"}] if isinstance(content, list) else "hi"},
                {"role": "assistant", "content": content},
            ]
            try:
                text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False)
            except Exception:  # noqa: BLE001 - some templates only accept one content form
                continue
            if sentinel in text:
                suffix = text.split(sentinel, 1)[1]
                break
    ids: list[int] = []
    if suffix:
        special = set(tokenizer.all_special_ids) | {
            i for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(tok, "special", False)
        }
        for token_id in tokenizer.encode(suffix.lstrip(" "), add_special_tokens=False):
            if token_id in special:
                ids.append(token_id)
            elif ids or tokenizer.decode([token_id]).strip():
                break  # stop at the first real text after the closing token(s)
    return ids
