"""Turn one (messages, images, answer) sample into model inputs with a model's own chat template.

Shared by the teacher pass and the student trainer: each model tokenizes the same
conversation its own way. The split between prompt and answer is made on the
rendered text: the prompt is the template with `add_generation_prompt=True`; the
answer is what the full conversation adds after it, cut right after the first
end-of-turn token. The answer is tokenized on its own (as generation would produce
it), so the answer ids never depend on how the prompt ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.vlm.generation import batched_images
from pipeline.vlm.models import tokenizer_of

SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


class TemplateError(ValueError):
    """The chat template cannot render this sample, or does not close the assistant turn."""


@dataclass
class EncodedSample:
    """Processor output for the prompt (batch dim 1) plus the answer's token ids."""

    sample_id: str
    prompt_inputs: dict  # input_ids [1, P], attention_mask, pixel_values, image_grid_thw, ...
    answer_ids: list[int]  # ends with an end-of-turn id
    answer_types: dict | None = None  # sequence key -> the value an answer token gets (default 0)

    @property
    def prompt_len(self) -> int:
        return int(self.prompt_inputs["input_ids"].shape[1])

    @property
    def total_len(self) -> int:
        return self.prompt_len + len(self.answer_ids)


def render(processor, messages: list[dict], add_generation_prompt: bool) -> str:
    """Chat-template text of `messages` (the processor's template, else the tokenizer's)."""
    owner = processor if getattr(processor, "chat_template", None) else tokenizer_of(processor)
    try:
        return owner.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises TemplateError, UndefinedError, TypeError...
        raise TemplateError(f"chat template failed: {type(err).__name__}: {err}") from None


def answer_token_ids(processor, messages: list[dict], answer: str, end_of_turn) -> list[int]:
    """Token ids of `answer` as the template closes it, ending with (and including) the end-of-turn token.

    A template that writes nothing after an assistant answer (many base-model and PaliGemma-style
    templates) is closed with the model's own end-of-turn id (`end_of_turn`: from the tokenizer or the
    generation config when the template has none, see pipeline/vlm/parts.py), as generation would stop."""
    prompt = render(processor, messages, add_generation_prompt=True)
    full = render(processor, messages + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}], False)
    if not full.startswith(prompt):
        raise TemplateError("the rendered conversation does not start with the rendered prompt")
    tail = full[len(prompt) :]
    ids = tokenizer_of(processor)(tail, add_special_tokens=False)["input_ids"]
    for i, token in enumerate(ids):
        if token in end_of_turn:
            return ids[: i + 1]
    if answer.strip() and tail.rstrip().endswith(answer.strip()) and end_of_turn:
        closing = end_of_turn[0] if isinstance(end_of_turn, (list, tuple)) else min(end_of_turn)
        return tokenizer_of(processor)(tail.rstrip(), add_special_tokens=False)["input_ids"] + [closing]
    raise TemplateError(f"the chat template does not close the assistant turn with an end-of-turn token {sorted(end_of_turn)}")


def encode_sample(processor, sample_id: str, messages: list[dict], images: list, answer: str, end_of_turn: set[int]) -> EncodedSample:
    """Processor inputs for the prompt (images expanded into image tokens) plus the answer ids."""
    prompt = render(processor, messages, add_generation_prompt=True)
    answer_ids = answer_token_ids(processor, messages, answer, end_of_turn)
    kwargs = {"text": [prompt], "return_tensors": "pt", **batched_images([images])}
    try:
        inputs = dict(processor(**kwargs))
    except Exception as err:  # processors raise ValueError / IndexError on placeholder-count mismatches
        raise TemplateError(f"processor failed: {type(err).__name__}: {err}") from None
    return EncodedSample(sample_id, inputs, answer_ids, answer_types(processor))


def answer_types(processor) -> dict:
    """Type ids of answer tokens where a family does not give them 0. A processor that takes a `suffix`
    (PaliGemma) runs a prefix-LM: prompt tokens (type 0) see each other both ways, suffix tokens (type 1,
    what generation appends too) are causal. An answer typed 0 would see the tokens after it."""
    import inspect

    try:
        takes_suffix = "suffix" in inspect.signature(type(processor).__call__).parameters
    except (TypeError, ValueError):
        takes_suffix = False
    return {"token_type_ids": 1} if takes_suffix else {}


def collate(samples: list[EncodedSample], pad_id: int) -> dict:
    """Right-padded batch of prompt + answer for a forward pass, from whatever tensors the processor returned.

    A tensor with a sequence dimension ([1, P, ...]) gets the answer appended along it and is padded to the
    longest row (pad id for input_ids, 0 otherwise):
    - input_ids: the answer ids; attention_mask: ones;
    - any other mask (e.g. Mllama's cross_attention_mask [1, P, images, tiles]): the last prompt position's
      row, repeated, so that answer tokens see what the last prompt token sees (as generation extends it);
    - the rest (token type ids, mm_token_type_ids): the family's answer type (`answer_types`), else 0.
    Every other tensor (pixel values, image grids, aspect ratios) is concatenated along dim 0, zero-padded in
    its other dimensions where samples differ (more images or tiles in one sample), as processors pad a batch.
    """
    length = max(s.total_len for s in samples)
    rows: dict[str, list] = {}
    others: dict[str, list] = {}
    for s in samples:
        for key, value in s.prompt_inputs.items():
            if not isinstance(value, torch.Tensor):
                continue
            if not _is_sequence(key, value, s.prompt_len):
                others.setdefault(key, []).append(value)
                continue
            row = torch.cat([value[0], _answer_tail(key, value[0], s)])
            pad_value = pad_id if key == "input_ids" else 0
            rows.setdefault(key, []).append(_pad_to(row, (length, *row.shape[1:]), pad_value))
    batch = {key: _stack_padded(v, stack=True) for key, v in rows.items()}
    batch.update({key: _stack_padded(v, stack=False) for key, v in others.items()})
    return batch


def _answer_tail(key: str, prompt_row: torch.Tensor, sample: EncodedSample) -> torch.Tensor:
    """What a sequence tensor holds at the answer positions (see `collate`)."""
    n = len(sample.answer_ids)
    if key == "input_ids":
        return torch.tensor(sample.answer_ids, dtype=prompt_row.dtype)
    if key == "attention_mask":
        return torch.ones(n, *prompt_row.shape[1:], dtype=prompt_row.dtype)
    if "mask" in key:
        return prompt_row[-1:].expand(n, *prompt_row.shape[1:]).clone()
    fill = (sample.answer_types or {}).get(key, 0)
    return torch.full((n, *prompt_row.shape[1:]), fill, dtype=prompt_row.dtype)


def _pad_to(x: torch.Tensor, shape: tuple, value=0) -> torch.Tensor:
    """`x` padded at the end of every dimension up to `shape`."""
    pads = []
    for have, want in zip(reversed(x.shape), reversed(shape)):
        pads += [0, want - have]
    return torch.nn.functional.pad(x, pads, value=value) if any(pads) else x


def _stack_padded(values: list[torch.Tensor], stack: bool) -> torch.Tensor:
    """Stacked (new dim 0) or concatenated (dim 0) after zero-padding dims 1.. (0.. when stacking) to the max."""
    first = 0 if stack else 1
    shape = [max(v.shape[d] for v in values) for d in range(first, values[0].dim())]
    padded = [_pad_to(v, (*v.shape[:first], *shape)) for v in values]
    return torch.stack(padded) if stack else torch.cat(padded)


NOT_SEQUENCE_KEYS = ("image_grid_thw", "video_grid_thw", "image_sizes")


def _is_sequence(key: str, value: torch.Tensor, prompt_len: int) -> bool:
    """A tensor whose dim 1 runs over the prompt's tokens (besides the keys every family uses for them)."""
    if key in SEQUENCE_KEYS:
        return True
    return (value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == prompt_len and key not in NOT_SEQUENCE_KEYS
            and not key.startswith("pixel_values"))
