"""Comparing answers: one normaliser for the dump's keep-if-correct filter and for evaluation.

    normalize_answer("  The Circle. ") == "circle"
    is_match("The Circle.", "circle")                  # evaluation: equal after normalising
    answers_agree("The shape is a circle.", "circle")  # dump filter: the reference stated in the response
"""

from __future__ import annotations

import re


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed (VQA-style)."""
    text = re.sub(r"[^\w\s]", " ", str(text).lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def is_match(prediction: str, answer: str) -> bool:
    """Exact match after normalising both sides (what `student eval` scores)."""
    return normalize_answer(prediction) == normalize_answer(answer)


def answers_agree(generated: str, reference: str) -> bool:
    """True when the normalized reference appears as whole words in the normalized response.

    Meant for short references ("circle", "yes"): a detailed response that states the
    reference counts as correct. A response naming both yes and no does not.
    """
    gen, ref = normalize_answer(generated), normalize_answer(reference)
    if not ref or not gen:
        return False
    if ref in ("yes", "no") and {"yes", "no"} <= set(gen.split()):
        return False
    return re.search(rf"(^| ){re.escape(ref)}( |$)", gen) is not None
