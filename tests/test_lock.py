"""A run folder belongs to one process: a second run on it is refused at once, naming the holder,
and a lock left by a killed run never blocks."""

from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from igpt import IgptError
from igpt.checkpoint import RunFolder
from igpt.runlock import LOCK
from igpt.runrecord import RUN_CONFIG

TRAIN_ARGS = ["train", "--data", "digits", "--resolution", "8", "--clusters", "16", "--n-layer", "1", "--n-embd", "32",
              "--n-head", "2", "--batch-size", "16", "--steps", "400", "--eval-every", "200", "--save-every", "2",
              "--sample-every", "400", "--eval-batches", "1"]


def prepare(folder: RunFolder, resume: bool = False) -> RunFolder:
    folder.prepare(resume=resume, differences=lambda saved: [])
    return folder


def test_a_held_folder_is_refused_in_the_same_process_until_closed(tmp_path):
    out = tmp_path / "run"
    first = prepare(RunFolder(out))
    held = (out / LOCK).read_bytes()
    assert held.split()[0] == str(os.getpid()).encode()
    refusal = rf"--out {re.escape(str(out))} is in use by process {os.getpid()}\b.*another folder"
    with pytest.raises(IgptError, match=refusal):
        prepare(RunFolder(out))
    assert (out / LOCK).read_bytes() == held  # the refused run leaves the lock as it was
    first.close()
    with prepare(RunFolder(out)):  # a folder holding only the lock counts as empty
        with pytest.raises(IgptError, match="in use"):
            prepare(RunFolder(out))
    prepare(RunFolder(out)).close()  # leaving the block released it


def test_a_lock_is_released_when_its_folder_is_garbage_collected(tmp_path):
    prepare(RunFolder(tmp_path / "run"))  # dropped at once, as by a run that never calls close()
    gc.collect()
    prepare(RunFolder(tmp_path / "run")).close()


def test_a_stale_pid_does_not_block_and_a_failed_start_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK).write_text("999999999\nigpt train\n")  # from a run killed long ago
    (out / RUN_CONFIG).write_text("{}")
    with pytest.raises(IgptError, match="not empty"):
        prepare(RunFolder(out))
    assert (out / LOCK).read_text() == "999999999\nigpt train\n"  # a refused run changes nothing
    (out / RUN_CONFIG).unlink()
    with prepare(RunFolder(out)):
        assert (out / LOCK).read_text().split()[0] == str(os.getpid())
    with pytest.raises(IgptError, match="nothing to resume"):
        prepare(RunFolder(tmp_path / "new"), resume=True)
    fresh = prepare(RunFolder(tmp_path / "fresh"))
    fresh.discard_if_empty()  # the run failed before writing anything
    assert not (tmp_path / "fresh").exists()


@pytest.fixture
def env(tmp_path_factory) -> dict:
    """Subprocesses share the session's data cache (never ~/.cache) and take one core each."""
    cache = os.environ.get("IGPT_CACHE") or str(tmp_path_factory.getbasetemp() / "cache")
    return {**os.environ, "IGPT_CACHE": cache, "OMP_NUM_THREADS": "1"}


def _train(out, env, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "igpt.cli", *TRAIN_ARGS, "--out", str(out), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _holds(out, pid: int) -> bool:
    path = out / LOCK
    return path.is_file() and path.read_text().split()[:1] == [str(pid)]


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")
def test_a_second_train_on_a_busy_folder_fails_at_once_and_a_killed_run_never_blocks(tmp_path, env):
    out = tmp_path / "run"
    first = _train(out, env)
    try:
        _wait_for(lambda: _holds(out, first.pid) and (out / RUN_CONFIG).is_file(), first, "the first checkpoint")
        first.send_signal(signal.SIGSTOP)  # holds the folder, and writes nothing while the second one tries
        before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
        second = subprocess.run([sys.executable, "-m", "igpt.cli", *TRAIN_ARGS, "--out", str(out)],
                                capture_output=True, text=True, env=env, timeout=120)
        assert second.returncode == 1
        err = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(err) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"--out {out} is in use by process {first.pid} (igpt train)" in err[0]
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # metrics.jsonl too
    finally:
        first.kill()
        first.communicate()
    assert _holds(out, first.pid)  # the killed run's PID stays in the file: it must not count as a holder
    with prepare(RunFolder(out), resume=True):  # what --resume does first, minus seconds of starting up
        assert _holds(out, os.getpid())
