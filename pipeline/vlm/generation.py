"""Teacher- or student-written answers: one `generate` call over many prompts, through HF transformers or vLLM.

    generator = HFGenerator(loaded_vlm, GenerationSettings(max_new_tokens=32), batch_size=16)
    texts = generator.generate([(prompt_text, [pil_image, ...]), ...])   # same order as the prompts

`HFGenerator` is the one HF generator of the project: the dump's `--backend hf` and `student eval`
both use it. `VLLMGenerator` is the dump's fast path on GPU servers (`--backend auto` picks it when
the `vllm` extra is installed and a GPU is there). The HF feature pass stays the reference for
hidden states in either case.

Both backends sample with `effective_sampling`: the model's generation_config.json first (repetition
penalty and the like, which vLLM drops once it is handed explicit SamplingParams), then every
`GenerationSettings` value given; they stop at the same ids (`stop_token_ids`). The dump records the
result in the cache manifest.

torch and transformers are imported inside the functions that use them: the CLI builds its
dump-teacher options from `GenerationSettings` and must not pay seconds of imports for `--help`.
"""

from __future__ import annotations

import importlib.util
from dataclasses import asdict, dataclass
from typing import Callable


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings: each one set here overrides the model's generation_config.json (both backends)."""

    max_new_tokens: int = 256
    """Longest answer the teacher may write, in tokens."""
    temperature: float = 0.0
    """0 means greedy decoding (the default, whatever the model's generation config says)."""
    top_p: float | None = None
    """Nucleus sampling mass (default: the model's generation config, else 1.0; ignored when greedy)."""
    sampling_top_k: int | None = None
    """Sample from the k likeliest tokens (default: the model's generation config, else 0 = all; ignored when
    greedy). Named apart from the dump's --top-k, the log-probs stored."""
    min_p: float | None = None
    """Minimum probability relative to the likeliest token (default: the model's generation config, else 0;
    ignored when greedy)."""
    repetition_penalty: float | None = None
    """Penalty on tokens already in the prompt or answer, greedy too (default: the model's generation config,
    else 1.0 = none)."""
    seed: int = 0
    """Sampling seed."""

    def to_dict(self) -> dict:
        return asdict(self)


# The sampling values both backends support, with the value that turns each one off. They are what vLLM reads
# from a generation config (vllm.config.ModelConfig.get_diff_sampling_param) and what HF generate applies.
NEUTRAL = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0}
GREEDY_IGNORES = ("top_p", "top_k", "min_p")


def effective_sampling(settings: GenerationSettings, generation_config, stop_token_ids) -> dict:
    """What a backend samples with: the model's generation config, then every setting given here on top.

    `generation_config` is a transformers GenerationConfig (or None): only its explicitly set values count
    (`to_diff_dict`), so HF's global defaults (top_k=50) never leak in. Greedy decoding records the
    sampling-only values as neutral, so two greedy runs compare equal in the manifest whatever the model says.
    The result is recorded in the cache manifest (`responses.sampling`)."""
    model = generation_config.to_diff_dict() if generation_config is not None else {}
    out = {"max_new_tokens": settings.max_new_tokens, "temperature": float(settings.temperature)}
    for name, neutral in NEUTRAL.items():
        ours = getattr(settings, "sampling_top_k" if name == "top_k" else name)
        value = ours if ours is not None else model.get(name)
        out[name] = type(neutral)(value) if value is not None else neutral
    if settings.temperature <= 0:
        out.update({name: NEUTRAL[name] for name in GREEDY_IGNORES})
    out["seed"] = settings.seed
    out["stop_token_ids"] = sorted({int(i) for i in stop_token_ids})
    return out


def stop_token_ids(end_of_turn, tokenizer, generation_config) -> list[int]:
    """Where an answer ends: the chat template's end-of-turn ids, the generation config's eos ids and the
    tokenizer's eos id (vLLM stops at the last two on its own, so HF must too for equal answers)."""
    ids = set(end_of_turn)
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    ids.update([eos] if isinstance(eos, int) else list(eos or []))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def loaded_sampling(vlm, settings: GenerationSettings) -> dict:
    """`effective_sampling` of a loaded VLM (`pipeline.vlm.models.LoadedVLM`), from the generation config HF
    loaded with it: what HFGenerator samples with and what the dump's manifest records."""
    config = getattr(vlm.model, "generation_config", None)
    return effective_sampling(settings, config, stop_token_ids(vlm.end_of_turn, vlm.tokenizer, config))


def load_generation_config(path: str, revision: str | None = None, trust_remote_code: bool = False):
    """The GenerationConfig that `from_pretrained` gives an HF model of `path`: generation_config.json, or
    else one derived from config.json (so the vLLM side, which loads no HF model, reads the same values)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path, revision=revision)
    except OSError:  # no generation_config.json
        config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
        return GenerationConfig.from_model_config(config)


Prompt = tuple[str, list]  # (chat-template text ending with the generation prompt, PIL images)


class HFGenerator:
    """Batched `model.generate` on a loaded VLM (`pipeline.vlm.models.LoadedVLM`).

    Prompts are left-padded, so that every row's new tokens start at the same column, and each
    answer is cut at the first stop id (`stop_token_ids`). Greedy answers do not depend on
    `batch_size` (tests/test_generation.py compares them with plain batch-1 `generate`). Sampled
    answers (temperature > 0) do: the seed is set once per batch. `self.sampling` (see
    `effective_sampling`) is passed to `generate` in full, the same values VLLMGenerator sends.
    """

    name = "hf"

    def __init__(self, vlm, settings: GenerationSettings, batch_size: int = 16):
        if batch_size < 1:
            raise ValueError(f"generate batch size must be >= 1, got {batch_size}")
        self.vlm, self.settings, self.batch_size = vlm, settings, batch_size
        self.sampling = loaded_sampling(vlm, settings)
        self.stop_ids, self.pad_id = self.sampling["stop_token_ids"], vlm.pad_id
        self.batches_done = 0  # the first batch is the probe: a failure there that every batch would share stops

    def generate(self, prompts: list[Prompt]) -> list[str | Failed]:
        """One answer per prompt, in the prompts' order; a `Failed` for a prompt the model cannot answer.

        A batch that fails is tried again a prompt at a time, so one bad sample never costs its batch. If
        the first batch fails as a batch while its prompts pass alone, batching itself is broken for this
        family (every batch would fail): `GenerationError` stops the run before it spends time, saying so;
        likewise when every prompt of the first batch fails on its own."""
        # Prompts of similar size share a batch, so that little compute goes to padding. Image
        # pixels come first: with dynamic-resolution families they decide most of the length.
        order = sorted(range(len(prompts)), key=lambda i: (_pixels(prompts[i][1]), len(prompts[i][0])))
        texts: list[str | Failed] = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            for i, text in zip(rows, self._batch_or_each([prompts[i] for i in rows])):
                texts[i] = text
            self.batches_done += 1
        return texts

    def _batch_or_each(self, prompts: list[Prompt]) -> list[str | Failed]:
        try:
            return self._batch(prompts)
        except Exception as err:  # noqa: BLE001 - any model/processor failure becomes a reject or a stop
            batch_error = err
        each = [self._one(p) for p in prompts]
        failed = [x for x in each if isinstance(x, Failed)]
        if self.batches_done == 0 and len(prompts) > 1 and not failed:
            raise GenerationError(
                f"generation fails for {self._family()} at batch size {self.batch_size} and works one prompt at a "
                f"time: {_describe(batch_error)}. Run with --generate-batch-size 1 (`student eval`: --batch-size 1), "
                "and report the family.") from None
        if self.batches_done == 0 and len(failed) == len(prompts):
            raise GenerationError(
                f"generation fails for {self._family()} on every prompt of the first batch, one at a time too: "
                f"{failed[0].reason}. Check that the model loads and generates on its own.") from None
        return each

    def _one(self, prompt: Prompt) -> str | Failed:
        try:
            return self._batch([prompt])[0]
        except Exception as err:  # noqa: BLE001
            return Failed(_describe(err))

    def _family(self) -> str:
        return f"model family {getattr(self.vlm, 'family', None) or type(self.vlm.model).__name__!r}"

    def _batch(self, prompts: list[Prompt]) -> list[str]:
        import torch

        inputs = self._inputs(prompts)
        s = self.sampling
        sampled = s["temperature"] > 0
        kwargs = dict(do_sample=sampled, num_beams=1, repetition_penalty=s["repetition_penalty"], max_new_tokens=s["max_new_tokens"])
        if sampled:  # set only when sampling: HF warns about sampling values given to greedy decoding
            kwargs.update(temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"], min_p=s["min_p"] or None)
            torch.manual_seed(s["seed"])
        with torch.inference_mode():
            out = self.vlm.model.generate(**inputs, eos_token_id=s["stop_token_ids"], pad_token_id=self.pad_id, **kwargs)
        return [self.decode(row) for row in out[:, inputs["input_ids"].shape[1] :].tolist()]

    def _inputs(self, prompts: list[Prompt]):
        tokenizer = self.vlm.tokenizer
        kwargs = {"text": [text for text, _ in prompts], "padding": True, "return_tensors": "pt"}
        kwargs.update(batched_images([row for _, row in prompts]))
        side, tokenizer.padding_side = tokenizer.padding_side, "left"
        try:
            return self.vlm.processor(**kwargs).to(self.vlm.device)
        finally:
            tokenizer.padding_side = side  # the dump's feature pass encodes with the same tokenizer

    def decode(self, ids: list[int]) -> str:
        """Text of generated ids up to (without) the first stop id; special tokens skipped."""
        stops = set(self.stop_ids)
        end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
        return self.vlm.tokenizer.decode(ids[:end], skip_special_tokens=True).strip()


@dataclass(frozen=True)
class Failed:
    """A prompt the model could not answer (the dump rejects its sample, `student eval` skips it)."""

    reason: str


class GenerationError(ValueError):
    """Generation cannot work for this model and setting: no sample would pass, so the run stops at once."""


def _describe(err: Exception) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def batched_images(rows: list[list]) -> dict:
    """The `images=` argument of a processor call over several prompts: one list of images per prompt.

    Every processor takes this nested layout (the base class flattens it where it wants a flat list),
    while some (Gemma 3, Mllama, Idefics3) need it to know which images belong to which prompt: a flat
    list reads as all images of the first prompt. Prompts without images keep an empty list."""
    return {"images": [list(row) for row in rows]} if any(rows) else {}


def _pixels(images: list) -> int:
    return sum(image.width * image.height for image in images)


class VLLMGenerator:
    """vLLM offline engine, sampling with `effective_sampling` (like HFGenerator) and stopping at the same ids.

    Run it in a process of its own (`pipeline.response_log.generate_with_vllm` does): deleting the engine does
    not reliably give its GPU memory back, and CUDA_VISIBLE_DEVICES must be set before vLLM is imported.
    `sampling` (from the caller's `effective_sampling`) saves reading the model's tokenizer and generation
    config again; `engine` and `make_params` can be stand-ins (tests, bench/vllm_contract_check.py).
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        settings: GenerationSettings,
        tensor_parallel_size: int = 1,
        trust_remote_code: bool = False,
        max_images: int = 1,
        dtype: str = "auto",
        max_model_len: int | None = None,
        revision: str | None = None,
        sampling: dict | None = None,
        engine=None,
        make_params: Callable | None = None,
    ):
        self.settings = settings
        self.sampling = sampling if sampling is not None else model_sampling(model_path, settings, revision, trust_remote_code)
        self.engine_args = dict(
            model=model_path,
            revision=revision,
            tensor_parallel_size=tensor_parallel_size,
            trust_remote_code=trust_remote_code,
            dtype=vllm_dtype(dtype),
            max_model_len=max_model_len,
            seed=settings.seed,
            limit_mm_per_prompt={"image": max_images},
        )
        if engine is None:
            from vllm import LLM

            # No prompt log-probs are read from vLLM (top-k comes from the HF pass), so
            # prefix caching may stay on; it must be off if prompt_logprobs are ever requested.
            engine = LLM(**self.engine_args)
        if make_params is None:
            from vllm import SamplingParams as make_params
        self.engine, self.make_params = engine, make_params

    def params(self):
        """The SamplingParams of every request: `self.sampling` under vLLM's names."""
        s = self.sampling
        return self.make_params(
            max_tokens=s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"],
            min_p=s["min_p"], repetition_penalty=s["repetition_penalty"], seed=s["seed"],
            stop_token_ids=list(s["stop_token_ids"]),
        )

    def generate(self, prompts: list[Prompt]) -> list[str]:
        outputs = self.engine.generate([vllm_request(text, images) for text, images in prompts], self.params(), use_tqdm=False)
        return [o.outputs[0].text.strip() for o in outputs]


def vllm_request(text: str, images: list) -> dict:
    """vLLM's prompt dict: the chat-template text, and the PIL images (one image alone, several as a list)."""
    request = {"prompt": text}
    if images:
        request["multi_modal_data"] = {"image": images if len(images) > 1 else images[0]}
    return request


def model_sampling(model_path: str, settings: GenerationSettings, revision=None, trust_remote_code=False,
                   processor=None) -> dict:
    """`effective_sampling` of a model folder or hub id, without loading its weights (`processor`: already loaded)."""
    from pipeline.vlm.models import end_of_turn_ids, tokenizer_of
    from pipeline.vlm.processors import load_processor

    if processor is None:
        processor = load_processor(model_path, trust_remote_code=trust_remote_code, revision=revision)
    tokenizer = tokenizer_of(processor)
    template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
    config = load_generation_config(model_path, revision, trust_remote_code)
    return effective_sampling(settings, config, stop_token_ids(end_of_turn_ids(tokenizer, template), tokenizer, config))


_VLLM_DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
                "half": "float16", "float32": "float32", "fp32": "float32", "float": "float32"}


def vllm_dtype(dtype: str) -> str:
    """--dtype under vLLM's name; 'auto' is bf16, as for the HF teacher on a GPU (vLLM's own 'auto' would run
    an fp32 folder in fp16)."""
    if dtype == "auto":
        return "bfloat16"
    if dtype not in _VLLM_DTYPES:
        raise ValueError(f"dtype {dtype!r} not understood: use 'auto', 'bfloat16', 'float32' or 'float16'")
    return _VLLM_DTYPES[dtype]


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
