"""Settings of a dump, loading the teacher, and what a dump writes once per cache.

DumpConfig's field docstrings are the dump-teacher options' help (pipeline/cli.py builds the options
from the fields), so each default and each explanation is written once, here. The CLI imports this
module to build its options: torch, transformers and the store are imported inside the functions that
need them, so that `pipeline --help` and `pipeline inspect` stay quick.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from schemas import (
    MIN_COSINE,
    TEACHER_HF_DIR,
    CacheManifest,
    DataInfo,
    FeatureEncoding,
    PositionsInfo,
    ResponsesInfo,
    StorageInfo,
    TeacherInfo,
    TopKInfo,
)
from pipeline.vlm.generation import GenerationSettings, loaded_sampling

if TYPE_CHECKING:
    import torch

    from pipeline.store.teacher_head import TeacherHead
    from pipeline.vlm.models import LoadedVLM


@dataclass(frozen=True)
class DumpConfig:
    """Everything `pipeline dump-teacher` needs; the CLI fills it from its options."""

    model: str
    """Teacher: alias (qwen2-vl-72b, ...), hub id, or local folder."""
    data: str
    """Data: LLaVA JSON, TRL jsonl/parquet/datasets folder, or easy-vqa:train / easy-vqa:test."""
    out: str
    """Cache folder (created if missing; an existing one is resumed)."""
    image_root: str | None = None
    """Folder that relative image paths in the data are resolved under (never left)."""
    split: str | None = None
    """Split of a datasets folder holding a DatasetDict."""
    responses: Literal["dataset", "generate"] = "dataset"
    """Where the answers come from: the data set's own (dataset), or written by the teacher first (generate)."""
    backend: Literal["auto", "vllm", "hf"] = "auto"
    """Generation backend: auto (vLLM when installed and on GPU), vllm, hf."""
    generation: GenerationSettings = field(default_factory=GenerationSettings)
    """Sampling settings for generated answers."""
    generate_batch_size: int = 16
    """Prompts per HF generate call (left-padded; greedy answers do not depend on it)."""
    keep_if_correct: bool = False
    """Keep a generated answer only when it agrees with the reference answer."""
    on_incorrect: Literal["reference", "reject"] = "reference"
    """With --keep-if-correct, what happens to a generated answer that disagrees: the reference answer is
    stored instead, or the sample is rejected."""
    tensor_parallel_size: int = 1
    """vLLM tensor parallel size."""
    top_k: int = 64
    """Top-k log-probs stored per position (0: none)."""
    logprob_dtype: Literal["float16", "float32"] = "float16"
    """Dtype of stored log-probs."""
    feature_encoding: Literal["bf16", "fp8_e4m3", "int8"] = "bf16"
    """How features are stored."""
    question_features_fraction: float = 0.0
    """Fraction of samples (chosen by id) that also store features at every prompt position."""
    layers: tuple[int, ...] = ()
    """Intermediate teacher layers to store besides the final features, at the same positions and in the same
    encoding: a list (8,16,24) or every:K (K, 2K, ... below the last layer). Layer l is transformers'
    output_hidden_states index l (the output of decoder layer l), so 1 <= l < the teacher's layer count; the final
    layer is always stored as the features. Each layer costs about as much as the features."""
    max_length: int = 4096
    """Longest sample in tokens (prompt with its image tokens + answer); longer samples are rejected (with
    --responses generate, a prompt that leaves no room for an answer is rejected before generation; vLLM's
    max_model_len)."""
    max_images: int | None = None
    """Samples with more images are rejected before generation (default: no limit; vLLM then allows the
    most images one sample of this worker has)."""
    max_reject_fraction: float = 0.5
    """Exit with an error (status 1, the leading reasons listed) when more than this fraction of this worker's
    samples are rejected, earlier runs included; 1.0: only when every sample is. The cache is kept either way."""
    max_batch_tokens: int = 8192
    """Padded tokens per forward batch."""
    window: int = 64
    """Samples prepared at a time (with --responses generate: answered and logged at a time); forward
    batches are length-sorted within a window."""
    dtype: str = "auto"
    """Teacher dtype: auto (bf16 on GPU, fp32 on CPU), bfloat16, float32, float16."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:N (ignored with a device map)."""
    device_map: str | None = None
    """'auto' spreads the teacher over all visible GPUs."""
    attn_implementation: str | None = None
    """sdpa, flash_attention_2, eager; default: the best available."""
    trust_remote_code: bool = False
    """Run code from the model repository (only when asked)."""
    revision: str | None = None
    """Hub revision of the teacher."""
    num_workers: int = 1
    """Workers splitting the data (default: WORLD_SIZE under torchrun)."""
    worker_index: int = 0
    """This worker's index (default: RANK under torchrun)."""
    shard_target_tokens: int = 8192
    """Stored positions per committed shard (a shard is the unit of commit and resume)."""
    chunk_tokens: int = 256
    """Zarr chunk length along tokens."""
    limit: int | None = None
    """Use only the first N samples of the data (before splitting between workers)."""

    def __post_init__(self):
        if self.generate_batch_size < 1:
            raise ValueError(f"--generate-batch-size must be >= 1, got {self.generate_batch_size}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"--max-images must be >= 1, got {self.max_images}")
        if not 0 <= self.max_reject_fraction <= 1:
            raise ValueError(f"--max-reject-fraction must be in [0, 1], got {self.max_reject_fraction}")
        if not 0 <= self.worker_index < self.num_workers:
            raise ValueError(f"--worker-index {self.worker_index} must be in [0, --num-workers {self.num_workers})")
        layers = tuple(self.layers)
        if any(not isinstance(l, int) or isinstance(l, bool) or l < 1 for l in layers) or len(set(layers)) != len(layers):
            raise LayerChoiceError(f"--layers {','.join(map(str, layers))}: give distinct layer indices >= 1 "
                                   "(0 is the embedding output, which is not stored)")
        object.__setattr__(self, "layers", tuple(sorted(layers)))


class LayerChoiceError(ValueError):
    """--layers names layers the teacher does not have, or is not a list / every:K; the message gives the range."""


@dataclass(frozen=True)
class EveryLayers:
    """`--layers every:K`: layers K, 2K, ... below the teacher's last layer (resolved once its layer count is known)."""

    k: int


def parse_layers(text: str | tuple | list | None) -> tuple[int, ...] | EveryLayers:
    """The --layers option: "8,16,24" -> (8, 16, 24); "every:4" -> EveryLayers(4); "" / None -> ()."""
    if text is None or isinstance(text, (tuple, list)):
        return tuple(text or ())
    text = text.strip().replace(" ", "")
    usage = ("--layers takes layer indices (8,16,24) or every:K (K, 2K, ... below the teacher's last layer); "
             f"got {text!r}")
    if not text:
        return ()
    if text.lower().startswith("every:"):
        k = text.split(":", 1)[1]
        if not k.isdigit() or int(k) < 1:
            raise LayerChoiceError(f"{usage}: K must be a positive integer")
        return EveryLayers(int(k))
    parts = text.strip(",").split(",")
    if not all(p.lstrip("-").isdigit() for p in parts):
        raise LayerChoiceError(usage)
    return tuple(int(p) for p in parts)


def resolve_layers(spec: tuple[int, ...] | EveryLayers, num_layers: int) -> tuple[int, ...]:
    """The layers of `spec` for a teacher with `num_layers` decoder layers; LayerChoiceError naming the valid range."""
    valid = (f"valid layers for this teacher ({num_layers} decoder layers) are 1..{num_layers - 1}: layer l is "
             f"transformers' output_hidden_states index l; 0 is the embedding output and {num_layers} the final layer, "
             "which is always stored as the features")
    if isinstance(spec, EveryLayers):
        layers = tuple(range(spec.k, num_layers, spec.k))
        if not layers:
            raise LayerChoiceError(f"--layers every:{spec.k} selects no layer; {valid}")
        return layers
    bad = [l for l in spec if not 1 <= l < num_layers]
    if bad:
        raise LayerChoiceError(f"--layers {','.join(map(str, spec))}: {','.join(map(str, bad))} out of range; {valid}")
    return tuple(sorted(set(spec)))


def teacher_layer_count(cfg: DumpConfig) -> int:
    """Decoder layers of the teacher as pipeline/vlm/parts.py finds them, from its config alone (no weights)."""
    from pipeline.vlm.models import decoder_layer_count

    return decoder_layer_count(cfg.model, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)


@dataclass
class LoadedTeacher:
    vlm: LoadedVLM
    head: TeacherHead
    end_of_turn: set[int]
    pad_id: int

    @property
    def processor(self):
        return self.vlm.processor

    @property
    def model(self):
        return self.vlm.model


def workers_from_env(num_workers: int | None, worker_index: int | None) -> tuple[int, int]:
    """Explicit flags win; otherwise torchrun's WORLD_SIZE / RANK; otherwise one worker."""
    n = num_workers if num_workers is not None else int(os.environ.get("WORLD_SIZE", 1))
    i = worker_index if worker_index is not None else int(os.environ.get("RANK", 0))
    return n, i


def writer_id(cfg: DumpConfig) -> str:
    return f"w{cfg.worker_index:05d}"


def my_slice(cfg: DumpConfig):
    """This worker's samples (DataSample or BadSample), in data order. Here, beside `writer_id`, because both the
    dump (pipeline/dump.py) and its vLLM child (pipeline/response_log.py) walk the same slice."""
    from pipeline.vlm.data import read_samples

    for i, sample in enumerate(read_samples(cfg.data, image_root=cfg.image_root, split=cfg.split)):
        if cfg.limit is not None and i >= cfg.limit:
            return
        if i % cfg.num_workers == cfg.worker_index:
            yield sample


def load_teacher(cfg: DumpConfig) -> LoadedTeacher:
    from pipeline.store.teacher_head import TeacherHead
    from pipeline.vlm.models import lm_head_and_scaling, load_vlm, pick_device

    vlm = load_vlm(
        cfg.model,
        dtype=cfg.dtype,
        device=pick_device(cfg.device),
        device_map=cfg.device_map,
        attn_implementation=cfg.attn_implementation,
        trust_remote_code=cfg.trust_remote_code,
        revision=cfg.revision,
    )
    module, scale, softcap = lm_head_and_scaling(vlm.model)
    head = TeacherHead(module.weight.detach(), getattr(module, "bias", None), scale, softcap)
    return LoadedTeacher(vlm, head, set(vlm.end_of_turn), vlm.pad_id)


def build_manifest(cfg: DumpConfig, teacher: LoadedTeacher, backend: str | None) -> CacheManifest:
    """The manifest of this dump; `backend` is the resolved generation backend (None: answers from the data)."""
    from pipeline.vlm.parts import vlm_parts

    vlm, head = teacher.vlm, teacher.head
    config = vlm.model.config
    num_layers = len(vlm_parts(vlm.model).layers)
    resolve_layers(cfg.layers, num_layers)  # a bad layer fails before the cache is created
    return CacheManifest(
        teacher=TeacherInfo(
            model=cfg.model,
            revision=cfg.revision,
            family=config.model_type,
            architecture=(config.architectures or [type(vlm.model).__name__])[0],
            hidden_size=int(head.weight.shape[1]),
            vocab_size=int(head.weight.shape[0]),
            tokenizer_vocab_size=len(vlm.tokenizer),
            dtype=str(vlm.model.dtype).removeprefix("torch."),
            tokenizer_fingerprint=tokenizer_fingerprint(vlm.tokenizer),
            end_of_turn_token_ids=tuple(sorted(teacher.end_of_turn)),
            chat_template=vlm.chat_template,
            logit_scale=head.logit_scale,
            final_logit_softcapping=head.softcap,
            head_has_bias=head.bias is not None,
            num_hidden_layers=num_layers,
        ),
        responses=ResponsesInfo(
            source=cfg.responses,
            backend=backend,
            sampling=loaded_sampling(vlm, cfg.generation) if cfg.responses == "generate" else {},
            keep_if_correct=cfg.keep_if_correct,
            on_incorrect=cfg.on_incorrect if cfg.keep_if_correct else None,
        ),
        data=DataInfo(source=cfg.data + (f"[{cfg.split}]" if cfg.split else ""), image_root=resolved_image_root(cfg)),
        features=feature_encoding(cfg.feature_encoding, vlm.model.dtype),
        topk=TopKInfo(k=cfg.top_k, logprob_dtype=cfg.logprob_dtype),
        positions=PositionsInfo(question_features_fraction=cfg.question_features_fraction),
        storage=StorageInfo(shard_target_tokens=cfg.shard_target_tokens, chunk_tokens=cfg.chunk_tokens),
        layers=tuple(cfg.layers),
    )


def resolved_image_root(cfg: DumpConfig) -> str | None:
    """The absolute folder `path:` references are relative to (a built-in data set's own folder when none was
    given), so that a student run reads the manifest instead of re-deriving it from the source's name."""
    from pipeline.vlm.data import image_root_for

    root = image_root_for(cfg.data, cfg.image_root, cfg.split)
    return os.path.abspath(root) if root is not None else None


def feature_encoding(encoding: str, source_dtype: torch.dtype) -> FeatureEncoding:
    """What the stored features are relative to the teacher's own hidden states.

    bf16 storage always holds the bf16 values the reader returns bit for bit; relative to the teacher
    it is lossless only for a bf16 teacher, and from fp32 it rounds (cosine >= 0.9999).
    """
    import torch

    source = str(source_dtype).removeprefix("torch.")
    if encoding == "bf16":
        lossless = source_dtype == torch.bfloat16
        return FeatureEncoding("bf16", source_dtype=source, lossless=lossless, min_cosine=1.0 if lossless else 0.9999)
    return FeatureEncoding(encoding, source_dtype=source, lossless=False, min_cosine=MIN_COSINE[encoding])


def save_teacher_files(out: str, teacher: LoadedTeacher) -> None:
    """Head + token embeddings + config + tokenizer/processor + chat template under teacher/, once per cache
    (atomic)."""
    from pipeline.store.teacher_embeddings import write_teacher_embeddings
    from pipeline.store.backend import open_storage
    from pipeline.store.teacher_head import write_teacher_head
    from pipeline.vlm.processors import save_processor

    write_teacher_head(out, teacher.head.weight, teacher.head.bias)
    write_teacher_embeddings(out, teacher.model)
    with open_storage(out).writing_folder(TEACHER_HF_DIR) as tmp:  # renamed or uploaded on exit; None: saved already
        if tmp is not None:
            teacher.model.config.save_pretrained(tmp)
            save_processor(teacher.processor, tmp)


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the vocabulary and the special tokens: equal fingerprints, equal token ids."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()), "special": sorted(tokenizer.all_special_tokens)}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()

