"""Progress lines outside a terminal: bounded in number, and the final state always printed."""

import io

from pipeline.progress import LineProgress, progress_bar


def test_lines_are_rate_limited_and_the_last_one_is_printed():
    out = io.StringIO()
    bar = LineProgress(total=100, desc="stage 2", unit="step", interval=3600, stream=out)
    for _ in range(100):
        bar.update(1)
    bar.set_postfix(loss="0.5")
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stage 2: 100/100 steps")


def test_every_update_prints_without_a_rate_limit():
    out = io.StringIO()
    bar = LineProgress(total=None, desc="dump", unit="sample", interval=0, stream=out)
    bar.set_postfix(rejected=2)
    bar.update(5)
    bar.update(5)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["dump: 5 samples", "dump: 10 samples", "dump: 10 samples"]
    assert lines[0].endswith("rejected=2")


def test_disabled_and_non_terminal(capsys):
    assert progress_bar(10, "x", enabled=False) is None
    assert isinstance(progress_bar(10, "x"), LineProgress)  # pytest's captured stderr is not a terminal
