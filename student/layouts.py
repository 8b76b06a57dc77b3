"""Every Recalibrator layout, declared once: what the main path feeds the Recalibrator for each sample, and what
it needs from the cache beyond the features.

    layout_named("teacher-tokens").segments(hidden, items, rec)   # [[(tensor, space), ...] per sample]

The cache holds, per sample, the teacher's features z_al at [last prompt position, a_0 .. a_{n-2}] (n rows)
and the targets gt_l = [a_0 .. a_{n-1}]; the Recalibrator's outputs at the last n positions are scored against
gt_l through the frozen teacher head (student/step.py). A layout decides what stands at those positions:

| layout | student part | answer part | what predicts a later token t > 0 |
|---|---|---|---|
| student-last-prompt (default) | the whole prompt | z_al[1:] | the teacher's hidden state at t - 1 (it carries a_t) |
| teacher-last-prompt | the prompt but its last position | z_al | the same; the first slot too |
| teacher-tokens | the whole prompt | the embeddings of a_0 .. a_{n-2} | the student's question and the tokens so far |

With the first two, every later slot can be read off the teacher's own state, whose head output *is* the next
token: the student is needed at the first slot only (`question_reliance_later` in metrics.jsonl shows it).
teacher-tokens feeds the Recalibrator the tokens already said, as a language model sees them, so it must predict
each next token from the student's question: the teacher's distribution (head on the cached features, or the
cached top-k) stays the target. Its embeddings are the teacher's own (teacher/embed_tokens.safetensors, written
by the dump; pipeline/store/teacher_embeddings.py), through the Recalibrator's own projection `proj_tokens`.

To add a layout: write its segments function and add it to LAYOUTS; nothing else changes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

STUDENT, TEACHER, TOKENS = "student", "teacher", "tokens"  # the spaces a segment can be in (student/recalibrator.py)


@dataclass(frozen=True)
class Layout:
    name: str
    summary: str  # one line for --help
    segments: Callable  # (hidden [B, L, d_s], items, rec) -> per sample [(tensor, space), ...]
    token_embeddings: bool = False  # needs the teacher's token embeddings (the cache's teacher/embed_tokens file)


def student_last_prompt(hidden, items, rec=None):
    return [[(hidden[b, : item.student.prompt_len], STUDENT), (item.teacher_features[1:], TEACHER)]
            for b, item in enumerate(items)]


def teacher_last_prompt(hidden, items, rec=None):
    return [[(hidden[b, : item.student.prompt_len - 1], STUDENT), (item.teacher_features, TEACHER)]
            for b, item in enumerate(items)]


def teacher_tokens(hidden, items, rec):
    return [[(hidden[b, : item.student.prompt_len], STUDENT), (rec.token_rows(item.teacher_targets[:-1]), TOKENS)]
            for b, item in enumerate(items)]


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("student-last-prompt", "the student's whole prompt, then the teacher's answer features but the first: the "
           "first answer token comes from the student's last prompt position", student_last_prompt),
    Layout("teacher-last-prompt", "the student's prompt but its last position, then all the teacher's answer features "
           "(the paper's order: the first slot is the teacher's own last prompt state)", teacher_last_prompt),
    Layout("teacher-tokens", "the student's whole prompt, then the teacher's answer tokens already said, as its token "
           "embeddings: every answer token is predicted from the student's question (needs a cache with "
           "teacher/embed_tokens.safetensors)", teacher_tokens, token_embeddings=True),
)}
DEFAULT_LAYOUT = "student-last-prompt"


def layout_named(name: str) -> Layout:
    if name not in LAYOUTS:
        raise ValueError(f"unknown Recalibrator layout {name!r}: one of {', '.join(LAYOUTS)}")
    return LAYOUTS[name]


def regularizer_segments(items, layout: Layout, rec) -> list[list[tuple]]:
    """The regularizer's input (Alg. 2) for samples with the teacher's question features z_ql: z_ql, then the
    layout's answer part (z_al[1:], the same sequence as z_ql[:-1] + z_al since z_ql's last row is z_al's first;
    or the answer tokens' embeddings)."""
    if layout.token_embeddings:
        return [[(item.teacher_question, TEACHER), (rec.token_rows(item.teacher_targets[:-1]), TOKENS)] for item in items]
    return [[(item.teacher_question, TEACHER), (item.teacher_features[1:], TEACHER)] for item in items]


def layouts_help() -> str:
    return "; ".join(f"{layout.name}: {layout.summary}" for layout in LAYOUTS.values()) + "."
