"""One training step of each method at real shapes, timed, with its peak memory (bench/scale_bench.py's rows).

    runner = StepRunner(vlm, shapes, device, bf16, steps=3, warmup=1)
    result = runner.run(Case("genrecal-stage2", "genrecal", 2, question=True))   # {"seconds", "cpu_seconds", "peak_mb"}

A step is what student/loop.py does for one micro-batch: zero the gradients, the stage's declared loss
(student/methods.py: the same function the trainer calls), backward, clip, AdamW. The question-reliance
diagnostic (every --attention-every steps) is left out. Each case builds what trains beside the student afresh
(the Recalibrator: copies of the student's last two layers; VLsI's verbalizers) and drops it afterwards, so the
peak memory of a case holds only what that method holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

from scale_setup import Shapes, encode_prompt, make_batch, teacher_head, teacher_side


@dataclass(frozen=True)
class Case:
    label: str
    method: str  # student/methods.py METHODS key
    stage: int
    question: bool = False  # the sample carries the teacher's question features (the regularizer runs)
    layout: str | None = None  # Recalibrator layout (None: the default)
    shapes: dict = field(default_factory=dict)  # Shapes changes (answer_tokens, teacher, teacher_vocab, head_dtype)
    head_path: str = "weighted"  # "plain": GenRecal's head terms as before weighted_head_loss (the before rows)


class PeakRSS:
    """The process's peak resident memory while it runs, sampled every few ms (CUDA: max_memory_allocated)."""

    def __init__(self, device: torch.device):
        self.device, self.peak, self._stop = device, 0, threading.Event()

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self):
        page = 4096
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self.peak = max(self.peak, int(f.read().split()[1]) * page)
                time.sleep(0.005)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def plain_head_terms(head, groups, cfg):
    """student/step.py's head terms as they were before weighted_head_loss (commit a0aa99c): `head_losses` per
    group (main path, regularizer), CE and KL each with its own backward head pass, each group's teacher logits
    computed on their own. Same values and gradients (tests/test_weighted_head_loss.py)."""
    from student.losses import TopKTarget, head_losses

    total, values = 0.0, []
    with torch.autocast(groups[0][0][0].device.type, enabled=False):
        for outputs, items in groups:
            r = torch.cat(outputs).float()
            targets = torch.cat([item.teacher_targets for item in items]).to(r.device)
            if cfg.teacher_distribution == "topk":
                teacher = TopKTarget.cat([item.teacher_topk for item in items], r.device)
            else:
                teacher = torch.cat([item.teacher_features for item in items]).to(r.device)
            ce, kl = head_losses(head, r, targets, teacher, cfg.chunk_tokens, cfg.temperature)
            total = total + cfg.ce_weight * ce + cfg.kl_weight * kl
            values.append((ce.detach(), kl.detach()))
    return total, values


@contextlib.contextmanager
def head_path(name: str):
    """GenRecal's head terms through `name`: "weighted" (student/step.py as it is) or "plain" (as it was)."""
    import student.step as step

    current = step.head_terms
    step.head_terms = plain_head_terms if name == "plain" else current
    try:
        yield
    finally:
        step.head_terms = current


def release_memory() -> None:
    """Give freed memory back to the system between cases, so each case's peak is its own."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class _Times:
    walls: list = field(default_factory=list)
    cpus: list = field(default_factory=list)
    updates: list = field(default_factory=list)

    def time(self, step, device: torch.device) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        update = step()
        _sync(device)
        self.walls.append(time.perf_counter() - wall)
        self.cpus.append(time.process_time() - cpu)
        self.updates.append(update)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepRunner:
    def __init__(self, vlm, base: Shapes, device: torch.device, bf16: bool, steps: int, warmup: int):
        self.vlm, self.base, self.device, self.bf16 = vlm, base, device, bf16
        self.steps, self.warmup = steps, warmup
        self._encoded, self._teacher, self._head = {}, {}, None  # EncodedSample, TeacherSide, (key, TeacherHead)
        self._optimizer = None  # the student's AdamW, shared by every case (student_optimizer)

    def shapes_of(self, case: Case) -> Shapes:
        return self.base.but(**case.shapes)

    def encoded(self, shapes: Shapes):
        key = (shapes.prompt_tokens, shapes.answer_tokens)
        if key not in self._encoded:
            self._encoded[key] = encode_prompt(self.vlm, shapes)
        return self._encoded[key]

    def head(self, shapes: Shapes):
        """The teacher head of `shapes`, kept until another shape is asked for (one head in memory at a time)."""
        key = (shapes.head_rows, shapes.teacher_width, shapes.head_dtype)
        if self._head is None or self._head[0] != key:
            self._head = None
            release_memory()
            head = teacher_head(shapes, len(self.vlm.tokenizer))
            head.weight = head.weight.to(self.device)
            self._head = (key, head)
        return self._head[1]

    def teacher(self, shapes: Shapes):
        """The cache row of `shapes` (its top-k needs the head once)."""
        key = (shapes.prompt_tokens, shapes.answer_tokens, shapes.head_rows, shapes.teacher_width, shapes.top_k)
        if key not in self._teacher:
            self._teacher[key] = teacher_side(self.encoded(shapes), shapes, self.head(shapes))
        return self._teacher[key]

    def drop_head(self) -> None:
        self._head = None
        release_memory()

    def run(self, case: Case) -> dict:
        """Median wall and CPU seconds of `steps` steps after `warmup`, the peak memory over all of them, and (but
        for SFT itself) the median ratio to an SFT step run right after each of them on the same batch: the machine
        may be shared, and a ratio of neighbouring steps sees the same load on both sides."""
        shapes = self.shapes_of(case)
        batch = make_batch(self.vlm, self.encoded(shapes), self.teacher(shapes), case.question, self.device)
        if case.method in ("kd", "uld") or case.stage == 3:
            head = None  # these never read the teacher head: a real run does not load it
            self.drop_head()
        else:
            head = self.head(shapes)
        release_memory()
        own, sft = _Times(), _Times()
        paired = case.stage != 3
        with PeakRSS(self.device) as peak, head_path(case.head_path):
            step = self._step_fn(case, shapes, head, batch)
            sft_step = self._step_fn(Case("sft", "genrecal", 3), shapes, None, batch) if paired else None
            for _ in range(self.warmup):
                step()
            for _ in range(self.steps):
                own.time(step, self.device)
                if paired:
                    sft.time(sft_step, self.device)
            del step, sft_step
        for p in self.vlm.model.parameters():
            p.grad = None
        release_memory()
        out = {"seconds": statistics.median(own.walls), "cpu_seconds": statistics.median(own.cpus),
               "optimizer_seconds": statistics.median(own.updates), "peak_mb": peak.mb, "steps": own.walls}
        if paired:
            out.update(sft_seconds=statistics.median(sft.walls), sft_steps=sft.walls,
                       paired_ratio=statistics.median(a / b for a, b in zip(own.walls, sft.walls)),
                       paired_cpu_ratio=statistics.median(a / b for a, b in zip(own.cpus, sft.cpus)))
        return out

    def profile(self, case: Case, rows: int = 20) -> str:
        """torch.profiler's table of one step of `case` (after one unprofiled step), the top `rows` by total time."""
        from torch.profiler import ProfilerActivity, profile

        shapes = self.shapes_of(case)
        batch = make_batch(self.vlm, self.encoded(shapes), self.teacher(shapes), case.question, self.device)
        head = None if case.method in ("kd", "uld") or case.stage == 3 else self.head(shapes)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        with head_path(case.head_path):
            step = self._step_fn(case, shapes, head, batch)
            step()
            with profile(activities=activities) as prof:
                step()
        del step
        for p in self.vlm.model.parameters():
            p.grad = None
        release_memory()
        key = "cuda_time_total" if self.device.type == "cuda" else "cpu_time_total"
        return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)

    def student_optimizer(self):
        """One AdamW over the student's trainable parameters for every case (its state is allocated once; a
        stage-1 step leaves the student's gradients None, which AdamW skips)."""
        from student.trainable import trainable_student_parameters

        if self._optimizer is None:
            self._optimizer = torch.optim.AdamW(trainable_student_parameters(self.vlm.model, 3), lr=1e-6)
        return self._optimizer

    def _step_fn(self, case: Case, shapes: Shapes, head, batch):
        """One training step of `case` as a function returning the seconds its optimizer update took."""
        from student.config import LossConfig
        from student.methods import METHODS, SFT, StepParts
        from student.scale import autocast
        from student.trainable import trainable_student_parameters

        model = self.vlm.model
        stage = SFT if case.stage == 3 else METHODS[case.method].stages[case.stage]
        loss = LossConfig() if case.layout is None else LossConfig(layout=case.layout)
        beside, beside_params = self._beside(case, shapes, loss)
        parts = StepParts(model, beside, head, loss, case.stage, vocab=len(self.vlm.tokenizer))
        optimizers = [self.student_optimizer()] + ([torch.optim.AdamW(beside_params, lr=1e-6)] if beside_params else [])

        def step() -> float:
            params = trainable_student_parameters(model, case.stage) + beside_params  # what this stage trains
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            with autocast(self.bf16, self.device):
                terms = stage.loss(parts, batch, False)
            terms["total"].backward()
            start = time.perf_counter()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            for optimizer in optimizers:
                optimizer.step()
            _sync(self.device)
            return time.perf_counter() - start  # the optimizer's share (the same update for every method)

        return step

    def _beside(self, case: Case, shapes: Shapes, loss):
        """(what trains beside the student, its trainable parameters) for the case's method and stage."""
        model = self.vlm.model
        if case.method == "genrecal" and case.stage in (1, 2):
            from student.layouts import layout_named
            from student.recalibrator import Recalibrator

            rec = Recalibrator.from_student(model, shapes.teacher_width, depth=2)
            if layout_named(loss.layout).token_embeddings:  # the cache's token table: the teacher's dtype (bf16)
                table = torch.randn(shapes.head_rows, shapes.teacher_width, dtype=torch.bfloat16,
                                    generator=torch.Generator().manual_seed(3))
                rec.attach_token_embeddings(table)
            rec = rec.to(self.device)
            return rec, list(rec.parameters())
        if case.method == "vlsi" and case.stage in (1, 2):
            return self._verbalizers(shapes)
        return None, []

    def _verbalizers(self, shapes: Shapes):
        """VLsI stage 2's parts as student/vlsi_train.py sets them up: the teacher's verbalizers frozen, the
        student's (at the default layers) trained, match window and vocabulary as the trainer passes them."""
        from dataclasses import fields

        from pipeline.vlm.parts import vlm_parts
        from student.config import TrainConfig
        from student.vlsi import Verbalizers, student_layers
        from student.vlsi_step import VLsIParts

        model = self.vlm.model
        window = next(f.default for f in fields(TrainConfig) if f.name == "match_window")
        depth = len(vlm_parts(model).layers)
        teacher = Verbalizers("teacher", shapes.vlsi_teacher_layers, shapes.teacher_width).to(self.device)
        teacher.requires_grad_(False)
        student = Verbalizers("student", student_layers(None, depth, shapes.vlsi_teacher_layers),
                              vlm_parts(model).hidden_size).to(self.device)
        return VLsIParts(teacher, student, len(self.vlm.tokenizer), window, False), list(student.parameters())
