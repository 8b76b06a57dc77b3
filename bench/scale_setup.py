"""The inputs of bench/scale_bench.py, built with the project's own code paths at the shapes users run.

    shapes = Shapes()                                   # Qwen2-0.5B text side, 7B-class teacher head, 1,024 + 128
    vlm = build_student(work, shapes)                   # pipeline/vlm/tiny.py builder -> saved folder -> load_vlm
    encoded = encode_prompt(vlm, shapes)                # the student's processor and chat template, one image
    teacher = teacher_side(encoded, shapes, vocab, d)   # what a cache row holds: features, ids, top-k, z_ql, layers
    batch = make_batch(vlm, encoded, teacher, with_question=True)   # a StudentBatch of one, as the loader gives it

Random weights throughout: cost does not depend on them. The teacher head's rows beyond the tokenizer are zero
(a trained model's padding rows never reach the top-k, and kd reads the top-k ids through the student's logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

# Qwen2-0.5B's text config (hidden 896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocab 151,936, tied embeddings)
STUDENT_TEXT = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                    num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=32768)
# a small real vision tower (Qwen2-VL's kind, 2 blocks): 448 x 448 pixels -> 256 image tokens
VISION = dict(depth=2, embed_dim=256, num_heads=4)
IMAGE_SIZE = 448
TEACHERS = {"7b": (152064, 3584), "72b": (152064, 8192)}  # class -> (head rows, width) of Qwen2-VL-7B / -72B
WORDS = ("red blue green small large round square circle triangle shape colour image picture left right top "
         "bottom middle near far light dark bright shadow object table chair window door house tree road sky "
         "water stone paper metal glass wood plant flower animal person car train boat street city field").split()


@dataclass(frozen=True)
class Shapes:
    student_layers: int = 24
    prompt_tokens: int = 1024  # image tokens included
    answer_tokens: int = 128  # the student's answer, end-of-turn included; the teacher's is the same ids
    teacher: str = "7b"
    teacher_vocab: int | None = None  # None: the class's own (scaling rows change it)
    top_k: int = 64
    vlsi_teacher_layers: tuple[int, ...] = (7, 14, 21)  # cached layers of a 28-layer teacher (VLsI)
    head_dtype: torch.dtype = field(default=torch.float32)

    @property
    def head_rows(self) -> int:
        return self.teacher_vocab or TEACHERS[self.teacher][0]

    @property
    def teacher_width(self) -> int:
        return TEACHERS[self.teacher][1]

    def but(self, **changes) -> "Shapes":
        return replace(self, **changes)


def build_student(work: Path, shapes: Shapes, device: str = "cpu"):
    """The student, built once per depth into `work` (a rerun reuses the folder) and loaded as the trainer loads it."""
    from pipeline.vlm.models import load_vlm
    from pipeline.vlm.tiny import build_tiny_vlm

    folder = work / f"student-{shapes.student_layers}L"
    if not (folder / "config.json").exists():
        text = dict(STUDENT_TEXT, num_hidden_layers=shapes.student_layers)
        build_tiny_vlm("qwen2-vl-tiny", folder, tokenizer="qwen2", seed=0, vision_config=VISION, image_size=IMAGE_SIZE,
                       **text)
    return load_vlm(folder, dtype="float32", device=device)


def _words(n: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i * 7) % len(WORDS)] for i in range(n))


def noise_image(seed: int = 0):
    from PIL import Image

    pixels = torch.randint(0, 256, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(seed))
    return Image.fromarray(pixels.numpy())


def sized_sample(processor, end_of_turn, shapes: Shapes, sample_id: str = "scale#0", offset: int = 0):
    """(EncodedSample, question text, answer text): an image and a question of `prompt_tokens` tokens in all, and
    an answer of `answer_tokens` tokens, through the processor and chat template as the trainer and the dump encode
    them (pipeline/vlm/prompting.py encode_sample); the word counts are adjusted until both come out exact."""
    from pipeline.vlm.prompting import encode_sample

    image, eot = noise_image(), set(end_of_turn)
    question, answer = shapes.prompt_tokens // 2, shapes.answer_tokens
    for _ in range(8):
        q_text, a_text = _words(question, offset), _words(answer, offset + 3)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q_text}]}]
        encoded = encode_sample(processor, sample_id, messages, [image], a_text, eot)
        dq, da = shapes.prompt_tokens - encoded.prompt_len, shapes.answer_tokens - len(encoded.answer_ids)
        if not dq and not da:
            return encoded, q_text, a_text
        question, answer = question + dq, answer + da
    raise RuntimeError(f"could not hit {shapes.prompt_tokens} + {shapes.answer_tokens} tokens "
                       f"(got {encoded.prompt_len} + {len(encoded.answer_ids)})")


def encode_prompt(vlm, shapes: Shapes, sample_id: str = "scale#0"):
    """The student's sample of `shapes` (see sized_sample)."""
    return sized_sample(vlm.processor, vlm.end_of_turn, shapes, sample_id)[0]


def teacher_head(shapes: Shapes, tokenizer_rows: int, seed: int = 1):
    """A random TeacherHead of the class's shape, rows beyond the tokenizer zero, in `shapes.head_dtype`."""
    from pipeline.store.teacher_head import TeacherHead

    rows, d = shapes.head_rows, shapes.teacher_width
    weight = torch.empty(rows, d, dtype=shapes.head_dtype)
    weight.normal_(0, 0.02, generator=torch.Generator().manual_seed(seed))
    weight[min(tokenizer_rows, rows):] = 0
    return TeacherHead(weight)


@dataclass
class TeacherSide:
    """What one cache row holds for a sample, as the reader decodes it (features rounded through bf16)."""

    features: torch.Tensor  # z_al [n, d]
    targets: torch.Tensor  # gt_l [n]
    topk: object | None  # TopKTarget
    question: torch.Tensor  # z_ql [prompt, d]
    layers: dict  # VLsI's cached layers: layer -> [n, d]


def teacher_side(encoded, shapes: Shapes, head, seed: int = 2) -> TeacherSide:
    """The teacher's row for `encoded`: its answer ids are the student's (one tokenizer: kd and vlsi pair them),
    cut into the head's vocabulary; top-k from pipeline/feature_pass.py's head_statistics on the features as stored."""
    from pipeline.feature_pass import head_statistics
    from student.losses import TopKTarget

    g = torch.Generator().manual_seed(seed)
    n, d = len(encoded.answer_ids), shapes.teacher_width

    def stored(rows: int) -> torch.Tensor:
        return torch.randn(rows, d, generator=g).to(torch.bfloat16).float()

    features = stored(n)
    question = stored(encoded.prompt_len)
    question[-1] = features[0]  # z_ql's last row is z_al's first (the last prompt position)
    targets = torch.tensor(encoded.answer_ids) % shapes.head_rows
    topk = None
    if shapes.top_k:
        stats = head_statistics(head, features, shapes.top_k)
        topk = TopKTarget(stats["topk_ids"], stats["topk_logprobs"].half().float(), stats["tail_logmass"])
    layers = {layer: stored(n) for layer in shapes.vlsi_teacher_layers}
    return TeacherSide(features, targets, topk, question, layers)


def make_batch(vlm, encoded, teacher: TeacherSide, with_question: bool, device="cpu"):
    """A StudentBatch of one sample, on `device` (the loop moves the inputs; the teacher rows are moved here too)."""
    from pipeline.vlm.prompting import collate
    from student.batches import StudentBatch, StudentItem
    from student.losses import TopKTarget

    topk = None if teacher.topk is None else TopKTarget(*(t.to(device) for t in (
        teacher.topk.ids, teacher.topk.logprobs, teacher.topk.tail_logmass)))
    item = StudentItem(encoded.sample_id, encoded, teacher.features.to(device), teacher.targets.to(device), topk,
                       teacher.question.to(device) if with_question else None,
                       {k: v.to(device) for k, v in teacher.layers.items()})
    inputs = {k: v.to(device) for k, v in collate([encoded], vlm.pad_id).items()}
    return StudentBatch(inputs, [item])
