"""Does the Recalibrator use the student? Question reliance, measured by taking the student away.

    terms = question_reliance(rec, head, main_segments, items)
    terms["question_reliance"]        # main-path CE with student questions shuffled in the batch - CE with the true ones
    terms["question_reliance_first"]  # the same for the first answer slot alone
    terms["question_reliance_later"]  # the same for every later slot (t > 0), averaged over them

Each sample's student segment (the first segment of its main-path input) is swapped for the next
sample's (a rotation of the batch, so no sample keeps its own), and the teacher-head CE against
the true targets is computed again. Near zero means the Recalibrator reads its answer without the
student, so no distillation signal can reach the student through it; the larger, the more the
outputs depend on the student's question. Attention weights cannot show this: attention can be
spread over the question while the values it carries are ignored.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.store.teacher_head import TeacherHead

CHUNK_POSITIONS = 1024


@torch.no_grad()
def question_reliance(rec, head: TeacherHead, main: list[list[tuple[torch.Tensor, str]]], items) -> dict:
    """{'question_reliance', 'question_reliance_first', 'question_reliance_later'} as 0-d tensors; zeros for a
    batch of one sample (and the last for answers of one token)."""
    if len(main) < 2:
        zero = torch.zeros(())
        return {"question_reliance": zero, "question_reliance_first": zero, "question_reliance_later": zero}
    out_lengths = [len(item.teacher_features) for item in items]
    targets = torch.cat([item.teacher_targets for item in items])
    shuffled = [[main[(b + 1) % len(main)][0], *segments[1:]] for b, segments in enumerate(main)]
    with torch.autocast(targets.device.type, enabled=False):
        true_ce = _position_ce(head, rec(main, out_lengths), targets)
        shuffled_ce = _position_ce(head, rec(shuffled, out_lengths), targets)
    firsts = torch.tensor([0] + out_lengths[:-1]).cumsum(0)
    later = torch.ones(len(true_ce), dtype=torch.bool)
    later[firsts] = False  # slots t > 0: with the default layouts the teacher's own state at t - 1 feeds them
    gap = shuffled_ce - true_ce
    return {
        "question_reliance": gap.mean().cpu(),
        "question_reliance_first": gap[firsts].mean().cpu(),
        "question_reliance_later": (gap[later].mean() if later.any() else torch.zeros(())).cpu(),
    }


def _position_ce(head: TeacherHead, outputs: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """CE of every scored position [N] through the teacher head, a chunk of positions at a time."""
    r = torch.cat(outputs).float()
    targets = targets.to(r.device)
    parts = [F.cross_entropy(head.logits(r[s : s + CHUNK_POSITIONS]), targets[s : s + CHUNK_POSITIONS], reduction="none")
             for s in range(0, len(r), CHUNK_POSITIONS)]
    return torch.cat(parts)
