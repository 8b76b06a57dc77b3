"""Mutation check: break one feature on purpose, run the tests that claim it, and see them fail.

    .venv/bin/python bench/mutation_check.py                    # every breakage; exit 1 if one is not caught
    .venv/bin/python bench/mutation_check.py bf16-off loss-inf  # only these
    .venv/bin/python bench/mutation_check.py --list             # names, what each breaks, the tests
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python bench/mutation_check.py --no-baseline

Each breakage in BREAKAGES is a name, a patch and the test ids that must catch it. For each one, pytest
runs on those tests in a fresh process with this file loaded as a plugin (`-p mutation_check`); the
plugin reads the breakage's name from $GENRECAL_MUTATION and applies its patch in `pytest_configure`,
before any test module is imported. A breakage is caught when pytest reports a failing test (exit 1);
an error (collection, usage) counts as not caught. First, unless --no-baseline, the same tests run once
unpatched: they must pass, or a failure would not mean anything.

A patch replaces a function in the module that defines it and in every loaded module that imported it
by name (`replace`), so `from x import f` bindings see the breakage too. Patches live in this process
only: a test that checks a subprocess (torchrun, another hash seed) sees the unpatched code there.
To add a breakage: write a function that applies it, and add (name, what it breaks, function, tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import subprocess
import sys
import time
from pathlib import Path

ENV = "GENRECAL_MUTATION"
REPO = Path(__file__).resolve().parents[1]


def replace(module_name: str, attr: str, new) -> object:
    """Replace `module.attr` by `new` there and in every loaded module holding the same object; returns the old one."""
    module = importlib.import_module(module_name)
    old = getattr(module, attr)
    for loaded in list(sys.modules.values()):
        namespace = getattr(loaded, "__dict__", None) or {}
        for name, value in list(namespace.items()):
            if value is old:
                setattr(loaded, name, new)
    return old


# -- the breakages ------------------------------------------------------------------------------------

def bf16_off():
    import student.scale

    checked = student.scale.use_bf16

    def never(precision, device):
        checked(precision, device)  # still validates the name
        return False

    replace("student.scale", "use_bf16", never)


def checkpointing_noop():
    replace("student.scale", "enable_gradient_checkpointing", lambda student, rec=None: None)


def keep_if_correct_off():
    replace("pipeline.vlm.answers", "answers_agree", lambda generated, reference: True)


def tail_bucket_dropped():
    import torch

    def topk_kl_without_tail(student_logprobs, teacher):  # KL over the top-k alone, both sides renormalised
        t = teacher.logprobs.float()
        t = t - torch.logsumexp(t, 1, keepdim=True)
        s = student_logprobs.gather(1, teacher.ids.long())
        s = s - torch.logsumexp(s, 1, keepdim=True)
        return (t.exp() * (t - s)).sum()

    replace("student.losses", "topk_tail_kl", topk_kl_without_tail)


def softcap_skipped():
    replace("pipeline.vlm.parts", "scale_and_cap", lambda logits, scale, softcap: logits * scale if scale != 1.0 else logits)


def stage3_saves_start_weights():
    import student.checkpoint
    import student.train

    write = student.checkpoint._write_checkpoint

    def write_stale(cfg, vlm, *args):  # the folder gets the weights the stage started from
        if cfg.stage != 3:
            return write(cfg, vlm, *args)
        trained = {k: v.detach().clone() for k, v in vlm.model.state_dict().items()}
        start = type(vlm.model).from_pretrained(student.train.student_source(cfg)).state_dict()
        vlm.model.load_state_dict(start)
        try:
            write(cfg, vlm, *args)
        finally:
            vlm.model.load_state_dict(trained)

    replace("student.checkpoint", "_write_checkpoint", write_stale)


def loss_inf():
    import student.step

    ce = student.step.student_ce
    replace("student.step", "student_ce", lambda logits, batch: ce(logits, batch) + float("inf"))


def question_features_by_hash():
    replace("pipeline.feature_pass", "wants_question_features",
            lambda sample_id, fraction: fraction > 0 and (hash(sample_id) % 2**32) / 2**32 < fraction)


def logits_everywhere():
    def full_forward(model, layers, **inputs):  # the whole model, lm_head on every position, then its hidden states
        for key in ("logits_to_keep", "output_hidden_states", "return_dict"):
            inputs.pop(key, None)
        states = model(**inputs, use_cache=False, output_hidden_states=True).hidden_states
        return states[-1], {layer: states[layer] for layer in layers}

    # the function both feature paths go through (body_forward calls it; dumps with --layers call it directly)
    replace("pipeline.vlm.parts", "body_forward_with_layers", full_forward)


def response_log_ignored():
    from pipeline.response_log import ResponseLog

    ResponseLog.get = lambda self, sample_id: None


def torchrun_env_ignored():
    replace("pipeline.dump_config", "workers_from_env",
            lambda n, i: (1 if n is None else n, 0 if i is None else i))


def fsdp_resume_unchecked():
    import torch

    import student.checkpoint

    load = student.checkpoint.load_resume_state

    def load_any(out, cfg, identity):  # pretends the run was trained the way it is resumed
        path = Path(out) / student.checkpoint.STATE_DIR / "state.pt"
        if path.exists():
            cfg = dataclasses.replace(cfg, fsdp=torch.load(path, weights_only=True).get("fsdp", False))
        return load(out, cfg, identity)

    replace("student.checkpoint", "load_resume_state", load_any)


def inspect_raw_bytes():
    import pipeline.store.inspect_cache

    summary = pipeline.store.inspect_cache.cache_summary

    def uncompressed(cache_dir):  # reports the raw size as the stored one
        s = summary(cache_dir)
        for a in s["arrays"].values():
            per = a["stored_bytes"] / a["stored_bytes_per_token"] if a["stored_bytes_per_token"] else None
            a["stored_bytes"] = a["raw_bytes"]
            a["stored_bytes_per_token"] = a["raw_bytes"] / per if per else None
        return s

    replace("pipeline.store.inspect_cache", "cache_summary", uncompressed)


def reliance_sign_flipped():
    import student.diagnostics

    reliance = student.diagnostics.question_reliance
    replace("student.diagnostics", "question_reliance",
            lambda *args: {k: -v for k, v in reliance(*args).items()})


SCALE, TRAIN, RESUME = "tests/test_student_scale.py", "tests/test_student_train.py", "tests/test_student_resume.py"
LOSSES, FEATURES, CLAIMS = "tests/test_student_losses.py", "tests/test_features_responses.py", "tests/test_dump_claims.py"

BREAKAGES = [
    ("bf16-off", "use_bf16 always false", bf16_off,
     [f"{SCALE}::test_bf16_autocast_stays_close_to_fp32_and_logs_the_question_reliance"]),
    ("checkpointing-noop", "enable_gradient_checkpointing does nothing", checkpointing_noop,
     [f"{SCALE}::test_gradient_checkpointing_recomputes_every_decoder_layer_in_the_backward_pass"]),
    ("keep-if-correct-off", "answers_agree always true", keep_if_correct_off,
     [f"{CLAIMS}::test_keep_if_correct_stores_agreeing_answers_and_falls_back_to_the_reference",
      f"{CLAIMS}::test_keep_if_correct_with_reject_refuses_disagreeing_answers"]),
    ("tail-bucket-dropped", "top-k KL without the tail bucket", tail_bucket_dropped,
     [f"{LOSSES}::test_chunked_equals_naive_values_and_gradients"]),
    ("softcap-skipped", "logit soft-cap not applied", softcap_skipped,
     [f"{LOSSES}::test_chunked_equals_naive_values_and_gradients",
      f"{FEATURES}::test_chunked_head_statistics_match_full_softmax"]),
    ("stage3-saves-start-weights", "stage 3 folder gets its starting weights", stage3_saves_start_weights,
     [f"{TRAIN}::test_three_stages_end_to_end"]),
    ("loss-inf", "the student CE is +inf", loss_inf, [f"{TRAIN}::test_three_stages_end_to_end"]),
    ("question-features-by-hash", "question-feature choice by hash()", question_features_by_hash,
     [f"{FEATURES}::test_question_feature_choice_is_the_same_in_every_process_and_near_the_fraction"]),
    ("logits-everywhere", "feature pass runs the lm_head on every position", logits_everywhere,
     [f"{CLAIMS}::test_the_teacher_head_runs_only_at_stored_positions"]),
    ("response-log-ignored", "the response log finds nothing", response_log_ignored,
     [f"{CLAIMS}::test_a_rerun_does_not_generate_logged_answers_again"]),
    ("torchrun-env-ignored", "WORLD_SIZE / RANK not read", torchrun_env_ignored,
     [f"{CLAIMS}::test_workers_come_from_torchrun_unless_given",
      f"{CLAIMS}::test_dump_teacher_under_torchrun_is_one_worker_per_rank"]),
    ("fsdp-resume-unchecked", "resume ignores how the run was sharded", fsdp_resume_unchecked,
     [f"{RESUME}::test_an_fsdp_run_resumes_only_with_fsdp_and_a_plain_one_only_without"]),
    ("inspect-raw-bytes", "inspect reports raw bytes as stored", inspect_raw_bytes,
     ["tests/test_verify_inspect.py::test_inspect_reports_counts_and_bytes_per_token"]),
    ("reliance-sign-flipped", "question reliance with the wrong sign", reliance_sign_flipped,
     ["tests/test_layouts.py::test_reliance_is_positive_when_the_answer_needs_the_question_and_matches_a_plain_computation"]),
]


# -- the pytest plugin --------------------------------------------------------------------------------

def pytest_configure(config):
    name = os.environ.get(ENV)
    if not name:
        return
    patches = {b[0]: b[2] for b in BREAKAGES}
    if name not in patches:
        import pytest

        raise pytest.UsageError(f"${ENV}={name!r} is not a breakage in {__file__}; choose one of {sorted(patches)}")
    patches[name]()


def pytest_report_header(config):
    name = os.environ.get(ENV)
    return f"mutation check: {name} applied" if name else None


# -- the runner ---------------------------------------------------------------------------------------

def run_pytest(tests: list[str], mutation: str | None, timeout: int) -> tuple[int, str, float]:
    """(pytest's exit code, the last lines of its output, seconds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "bench"), str(REPO)])}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop(ENV, None)
    if mutation:
        env[ENV] = mutation
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "mutation_check", "-p", "no:cacheprovider", *tests]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {timeout} s", time.perf_counter() - start
    tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
    return proc.returncode, tail, time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="breakages to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the breakages and their tests, run nothing")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unpatched run of the tests")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's last lines for each run")
    args = parser.parse_args(argv)
    known = {b[0]: b for b in BREAKAGES}
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown breakage(s) {unknown}; choose from {list(known)}")
    chosen = [known[n] for n in args.names] if args.names else BREAKAGES
    if args.list:
        for name, what, _, tests in chosen:
            print(f"{name}: {what}\n    " + "\n    ".join(tests))
        return 0
    if not args.no_baseline:
        tests = sorted({t for b in chosen for t in b[3]})
        code, tail, seconds = run_pytest(tests, None, args.timeout * 2)
        print(f"baseline (no breakage, {len(tests)} tests): {'pass' if code == 0 else 'FAIL'} in {seconds:.0f} s")
        if code != 0:
            print(tail)
            print("the tests fail without a breakage: fix them first, a failure under a breakage would mean nothing")
            return 2
    rows, missed = [], []
    for name, what, _, tests in chosen:
        code, tail, seconds = run_pytest(tests, name, args.timeout)
        caught = "yes" if code == 1 else ("no" if code == 0 else f"no (pytest exit {code})")
        if code != 1:
            missed.append(name)
        if args.verbose or code not in (0, 1):
            print(f"--- {name} (exit {code})\n{tail}")
        rows.append((name, what, ", ".join(t.split("::")[-1] for t in tests), caught, seconds))
        print(f"{name}: caught {caught} ({seconds:.0f} s)", flush=True)
    print("\n| breakage | what it breaks | tests | caught | s |\n|---|---|---|---|---|")
    for name, what, tests, caught, seconds in rows:
        print(f"| {name} | {what} | {tests} | {caught} | {seconds:.0f} |")
    print(f"\n{len(rows) - len(missed)} of {len(rows)} breakages caught" + (f"; missed: {', '.join(missed)}" if missed else ""))
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
