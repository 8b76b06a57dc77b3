"""The same-tokenizer check of the methods that compare the two models' distributions token by token
(`--method kd`, `--method vlsi`): the student must produce the teacher's ids for the teacher's tokens.

    check_same_tokenizer(student_tokenizer, reader.manifest, cache_dir, "path/to/student", "kd")

It runs before any model weights load: the student's tokenizer is read alone from its folder
(`load_tokenizer`), the teacher's side comes from the cache (the manifest's fingerprint and tokenizer
size; for the explanation of a mismatch, the teacher tokenizer saved under teacher/hf). The fingerprint
is pipeline/dump_config.py's `tokenizer_fingerprint`, the very function the dump recorded it with.
"""

from __future__ import annotations

from pipeline.dump_config import tokenizer_fingerprint
from schemas import TEACHER_HF_DIR


def load_tokenizer(model: str):
    """The tokenizer of a model folder, alias or hub id, without its weights (AutoTokenizer reads the
    tokenizer files only; it is the tokenizer the model's processor holds)."""
    from transformers import AutoTokenizer

    from pipeline.vlm.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(model))


def check_same_tokenizer(student_tokenizer, manifest, cache_dir, student_name: str, method: str) -> None:
    """Raise ValueError, naming both sides and what differs, unless the student's tokenizer is the cache
    teacher's: the same fingerprint (vocabulary and special tokens) and the same size."""
    teacher = manifest.teacher
    fingerprint = tokenizer_fingerprint(student_tokenizer)
    size = len(student_tokenizer)
    if fingerprint == teacher.tokenizer_fingerprint and size == teacher.tokenizer_vocab_size:
        return
    teacher_tokenizer = _saved_teacher_tokenizer(cache_dir)
    if teacher_tokenizer is not None and size == teacher.tokenizer_vocab_size and (
            tokenizer_fingerprint(teacher_tokenizer) == fingerprint):
        # the saved teacher tokenizer, read now the way the student's was, is the student's: the recorded
        # fingerprint differs only through how it was computed then (another transformers, the processor's copy)
        return
    details = differences(student_tokenizer, teacher_tokenizer) if teacher_tokenizer is not None else []
    if not details and size != teacher.tokenizer_vocab_size:
        details = [f"the student has {size} tokens, the teacher {teacher.tokenizer_vocab_size}"]
    if not details:
        details = ["the vocabularies or special tokens differ" + (
            " (the teacher tokenizer is not saved in the cache, so only the fingerprints could be compared)"
            if teacher_tokenizer is None else "")]
    raise ValueError(
        f"--method {method} compares the two models' distributions token by token, so the student must use the "
        f"teacher's tokenizer (the same tokens at the same ids), and it does not.\n"
        f"  student {student_name}: {size} tokens, tokenizer fingerprint {fingerprint[:16]}\n"
        f"  teacher {teacher.model} (cache {cache_dir}): {teacher.tokenizer_vocab_size} tokens, tokenizer "
        f"fingerprint {teacher.tokenizer_fingerprint[:16]}\n"
        f"  what differs: {'; '.join(details)}\n"
        "Use --method genrecal (the default), which distils across tokenizers through the Recalibrator and the "
        "teacher head (or --method uld, the cross-tokenizer baseline)."
    )


def differences(student_tokenizer, teacher_tokenizer, examples: int = 3) -> list[str]:
    """What differs between two tokenizers, in words: size, tokens only one side has, the first id whose
    token differs (token order), special tokens. [] when their vocabularies and special tokens are equal."""
    s_vocab, t_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    out = []
    if len(student_tokenizer) != len(teacher_tokenizer):
        out.append(f"the student has {len(student_tokenizer)} tokens, the teacher {len(teacher_tokenizer)}")
    only_s, only_t = sorted(set(s_vocab) - set(t_vocab)), sorted(set(t_vocab) - set(s_vocab))
    for side, tokens in (("student", only_s), ("teacher", only_t)):
        if tokens:
            out.append(f"{len(tokens)} tokens only the {side} has (e.g. {', '.join(map(repr, tokens[:examples]))})")
    s_by_id = {i: tok for tok, i in s_vocab.items()}
    t_by_id = {i: tok for tok, i in t_vocab.items()}
    moved = [i for i in sorted(set(s_by_id) & set(t_by_id)) if s_by_id[i] != t_by_id[i]]
    if moved:
        i = moved[0]
        out.append(f"token order: {len(moved)} ids hold other tokens, the first is id {i} ({s_by_id[i]!r} in the "
                   f"student, {t_by_id[i]!r} in the teacher)")
    s_special, t_special = set(student_tokenizer.all_special_tokens), set(teacher_tokenizer.all_special_tokens)
    if s_special != t_special and not out:
        out.append(f"special tokens: the student's {sorted(s_special - t_special)} against the teacher's "
                   f"{sorted(t_special - s_special)}")
    return out


def _saved_teacher_tokenizer(cache_dir):
    """The teacher's tokenizer the dump saved under teacher/hf (None when it cannot be read)."""
    from transformers import AutoTokenizer

    from pipeline.store.backend import open_storage

    folder = open_storage(cache_dir).local_folder(TEACHER_HF_DIR)  # a bucket's copy is downloaded
    if not folder.is_dir() or not any(folder.iterdir()):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None
