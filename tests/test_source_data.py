"""SFT on a data source: batches are grouped by prompt length only, never by the answer."""

from pipeline.vlm.models import load_vlm
from student.batches import SourceStudentData


def test_grouping_length_does_not_see_the_answer(tiny_vlm_dir):
    vlm = load_vlm(tiny_vlm_dir("llava-tiny", "tiny-bpe"))
    data = SourceStudentData("easy-vqa:train", vlm.processor, vlm.end_of_turn, vlm.pad_id, limit=300)
    by_question: dict[str, set] = {}
    for sample, length in zip(data.samples, data.lengths):
        by_question.setdefault(sample.messages[-1]["content"][-1]["text"] if isinstance(sample.messages[-1]["content"], list)
                               else sample.messages[-1]["content"], set()).add((sample.answer, length))
    # the same question with different answers gets the same grouping length
    repeated = [pairs for pairs in by_question.values() if len({a for a, _ in pairs}) > 1]
    assert repeated, "easy-VQA repeats questions with different answers"
    assert all(len({length for _, length in pairs}) == 1 for pairs in repeated)
