"""Teacher- or student-written answers: one `generate` call over many prompts, through HF transformers or vLLM.

    generator = HFGenerator(loaded_vlm, GenerationSettings(max_new_tokens=32), batch_size=16)
    texts = generator.generate([(prompt_text, [pil_image, ...]), ...])   # same order as the prompts

`HFGenerator` is the one HF generator of the project: the dump's `--backend hf` and `student eval`
both use it. `VLLMGenerator` is the dump's fast path on GPU servers (`--backend auto` picks it when
the `vllm` extra is installed and a GPU is there). The HF feature pass stays the reference for
hidden states in either case.

torch and transformers are imported inside the functions that use them: the CLI builds its
dump-teacher options from `GenerationSettings` and must not pay seconds of imports for `--help`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings, recorded in the cache manifest."""

    max_new_tokens: int = 256
    """Longest answer the teacher may write, in tokens."""
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
    """Batched `model.generate` on a loaded VLM (`pipeline.vlm.models.LoadedVLM`).

    Prompts are left-padded, so that every row's new tokens start at the same column, and each
    answer is cut at the chat template's first end-of-turn id. Greedy answers do not depend on
    `batch_size` (tests/test_generation.py compares them with plain batch-1 `generate`). Sampled
    answers (temperature > 0) do: the seed is set once per batch.
    """

    name = "hf"

    def __init__(self, vlm, settings: GenerationSettings, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"generate batch size must be >= 1, got {batch_size}")
        self.vlm, self.settings, self.batch_size = vlm, settings, batch_size
        self.end_of_turn, self.pad_id = list(vlm.end_of_turn), vlm.pad_id

    def generate(self, prompts: list[Prompt]) -> list[str]:
        """One answer per prompt, in the prompts' order."""
        # Prompts of similar size share a batch, so that little compute goes to padding. Image
        # pixels come first: with dynamic-resolution families they decide most of the length.
        order = sorted(range(len(prompts)), key=lambda i: (_pixels(prompts[i][1]), len(prompts[i][0])))
        texts: list[str] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            for i, text in zip(rows, self._batch([prompts[i] for i in rows])):
                texts[i] = text
        return texts

    def _batch(self, prompts: list[Prompt]) -> list[str]:
        import torch

        inputs = self._inputs(prompts)
        s = self.settings
        sampling = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p) if s.temperature > 0 else dict(do_sample=False)
        if s.temperature > 0:
            torch.manual_seed(s.seed)
        with torch.inference_mode():
            out = self.vlm.model.generate(
                **inputs, max_new_tokens=s.max_new_tokens, eos_token_id=self.end_of_turn, pad_token_id=self.pad_id, **sampling
            )
        return [self.decode(row) for row in out[:, inputs["input_ids"].shape[1] :].tolist()]

    def _inputs(self, prompts: list[Prompt]):
        tokenizer = self.vlm.tokenizer
        kwargs = {"text": [text for text, _ in prompts], "padding": True, "return_tensors": "pt"}
        images = [image for _, row in prompts for image in row]
        if images:
            kwargs["images"] = images
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            return self.vlm.processor(**kwargs).to(self.vlm.device)
        finally:
            tokenizer.padding_side = side  # the dump's feature pass encodes with the same tokenizer

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids up to (without) the first end-of-turn id; special tokens skipped."""
        stops = set(self.end_of_turn)
        end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
        return self.vlm.tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


def _pixels(images: list) -> int:
    return sum(image.width * image.height for image in images)


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
    import torch

    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def resolve_backend(backend: str) -> str:
    """'auto' -> 'vllm' when the vllm extra is installed and a GPU is there, else 'hf'; checks the others."""
    if backend == "auto":
        return "vllm" if vllm_available() else "hf"
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("--backend vllm needs the vllm extra: EXTRAS=dev,vllm bash scripts/setup.sh (GPU servers)")
    if backend not in ("hf", "vllm"):
        raise ValueError(f"unknown generation backend {backend!r}; choose auto, vllm or hf")
    return backend
