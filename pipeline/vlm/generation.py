"""Teacher-written answers: one `generate` call over many prompts, through vLLM or HF transformers.

    generator = make_generator("vllm" | "hf" | "auto", loaded, settings)
    texts = generator.generate([(prompt_text, [pil_image, ...]), ...])

vLLM is used when the `vllm` extra is installed and a GPU is there (`auto`); HF
`generate` otherwise. The HF feature pass stays the reference for hidden states in
either case.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from pipeline.vlm.models import tokenizer_of


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings, recorded in the cache manifest."""

    max_new_tokens: int = 256
    """Longest answer the teacher may write."""
    temperature: float = 0.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    """Nucleus sampling mass (ignored when greedy)."""
    seed: int = 0
    """Sampling seed."""

    def to_dict(self) -> dict:
        return asdict(self)


Prompt = tuple[str, list]  # (chat-template text ending with the generation prompt, PIL images)


class HFGenerator:
    """Batch-1 `model.generate`: simple and exact; throughput comes from the vLLM backend."""

    name = "hf"

    def __init__(self, model, processor, settings: GenerationSettings, end_of_turn: Sequence[int], pad_id: int):
        self.model, self.processor, self.settings = model, processor, settings
        self.end_of_turn, self.pad_id = list(end_of_turn), pad_id

    @torch.inference_mode()
    def generate(self, prompts: list[Prompt]) -> list[str]:
        return [self._one(text, images) for text, images in prompts]

    def _one(self, text: str, images: list) -> str:
        s = self.settings
        kwargs = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs).to(self.model.device)
        sampling = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p) if s.temperature > 0 else dict(do_sample=False)
        if s.temperature > 0:
            torch.manual_seed(s.seed)
        out = self.model.generate(
            **inputs, max_new_tokens=s.max_new_tokens, eos_token_id=self.end_of_turn, pad_token_id=self.pad_id, **sampling
        )
        new_tokens = out[0, inputs["input_ids"].shape[1] :]
        return tokenizer_of(self.processor).decode(new_tokens, skip_special_tokens=True).strip()


class VLLMGenerator:
    """vLLM offline engine; `engine` and `make_params` can be stand-ins (tests)."""

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        settings: GenerationSettings,
        tensor_parallel_size: int = 1,
        trust_remote_code: bool = False,
        max_images: int = 4,
        engine=None,
        make_params: Callable | None = None,
    ):
        self.settings = settings
        if engine is None:
            from vllm import LLM

            # No prompt log-probs are read from vLLM (top-k comes from the HF pass), so
            # prefix caching may stay on; it must be off if prompt_logprobs are ever requested.
            engine = LLM(
                model=model_path,
                tensor_parallel_size=tensor_parallel_size,
                trust_remote_code=trust_remote_code,
                seed=settings.seed,
                limit_mm_per_prompt={"image": max_images},
            )
        if make_params is None:
            from vllm import SamplingParams as make_params
        self.engine, self.make_params = engine, make_params

    def generate(self, prompts: list[Prompt]) -> list[str]:
        s = self.settings
        params = self.make_params(
            max_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p if s.temperature > 0 else 1.0, seed=s.seed
        )
        requests = []
        for text, images in prompts:
            request = {"prompt": text}
            if images:
                request["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
            requests.append(request)
        outputs = self.engine.generate(requests, params, use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def resolve_backend(backend: str) -> str:
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("--backend vllm needs the vllm extra: EXTRAS=dev,vllm bash scripts/setup.sh (GPU servers)")
    if backend not in ("hf", "vllm"):
        raise ValueError(f"unknown generation backend {backend!r}; choose auto, vllm or hf")
    return backend

