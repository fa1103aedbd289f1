"""Progress that fits where it goes: a bar on a terminal, plain lines in a pipe or a file, nothing with --quiet."""

from __future__ import annotations

import io
import os
import subprocess
import sys

from igpt.progress import BAR, LINES, QUIET, LineProgress, OutputOptions, progress_bar, say, style

SHORT_TRAIN = ["train", "--data", "digits", "--resolution", "8", "--steps", "30", "--batch-size", "32", "--eval-every",
               "15", "--n-layer", "2", "--n-embd", "32", "--n-head", "2"]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_one_rule_picks_a_bar_on_a_terminal_lines_elsewhere_and_nothing_when_quiet():
    from tqdm import tqdm

    assert style(stream=Terminal()) == BAR and style(stream=io.StringIO()) == LINES
    assert style(quiet=True, stream=Terminal()) == QUIET
    assert isinstance(progress_bar(10, stream=Terminal()), tqdm)
    assert isinstance(progress_bar(10, stream=io.StringIO()), LineProgress)
    assert OutputOptions(quiet=True).progress is False and OutputOptions().log is say


def test_lines_come_every_tenth_of_the_job_with_the_bars_figures_and_no_carriage_return():
    out = io.StringIO()
    bar = LineProgress(200, desc="pretrain", unit="step", stream=out, clock=Clock(0.01))
    for _ in range(200):
        bar.update()
        bar.set_postfix(loss="1.2345")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 10
    assert lines[-1].startswith("pretrain: 100% 200/200 [") and "step/s, loss=1.2345]" in lines[-1]
    assert lines[0].startswith("pretrain:  10% 20/200 [00:00<00:01,")  # elapsed<remaining, as the bar shows


def test_a_slow_job_gets_a_line_every_30_seconds():
    out = io.StringIO()
    bar = LineProgress(1000, initial=500, desc="pretrain", unit="step", stream=out, clock=Clock(31.0))
    for _ in range(3):
        bar.update()
    assert [line.split(" [")[0] for line in out.getvalue().splitlines()] == [
        f"pretrain:  50% {n}/1000" for n in (501, 502, 503)]
    assert "s/step" in out.getvalue()  # the rate counts this process's steps, not the resumed ones


def test_train_into_a_file_writes_a_bounded_number_of_plain_lines(tmp_path):
    log = tmp_path / "log.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "igpt.cli", *SHORT_TRAIN, "--out", str(tmp_path / "run")],
                              stdout=f, stderr=subprocess.STDOUT, env=env, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    lines = text.splitlines()
    assert "\r" not in text and len(lines) <= 20, text
    assert any(line.startswith("pretrain: 100% 30/30 [") and "loss=" in line for line in lines), text
    assert lines[-1].startswith("done: step 30")


def test_quiet_prints_only_the_closing_line(tmp_path, capfd):
    from igpt.cli import main

    assert main([*SHORT_TRAIN, "--out", str(tmp_path / "run"), "--quiet"]) == 0
    out, err = capfd.readouterr()
    assert err == "" and len(out.splitlines()) == 1 and out.startswith("done: step 30, best validation loss ")
