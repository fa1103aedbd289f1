"""Interruption and hostile files: SIGINT, SIGKILL at random moments, full disks, pickles with
payloads, and property tests that palette and image code never crash on odd input."""

from __future__ import annotations

import errno
import io
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from igpt import IgptError
from igpt.checkpoint import TRAIN_STATE, RunFolder
from igpt.palette import Palette
from igpt.train import Trainer
from conftest import PAPER_FLAGS, pretraining

TRAIN_ARGS = ["train", "--data", "digits", "--resolution", "8", "--n-layer", "1", "--n-embd", "16", "--n-head", "2",
              "--batch-size", "16", "--eval-every", "1000", "--sample-every", "1000", "--eval-batches", "1"]


def _start(args, out):
    return subprocess.Popen([sys.executable, "-m", "igpt.cli", *TRAIN_ARGS, *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ)


def _wait_for_steps(out, n: int, proc, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if sum('"loss"' in line for line in _lines(out)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {n}: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}")


def _lines(out):
    path = out / "metrics.jsonl"
    return path.read_text().splitlines() if path.is_file() else []


def test_sigint_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    proc = _start(["--steps", "100000", "--save-every", "100000"], out)
    _wait_for_steps(out, 3, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    assert "interrupted: checkpoint saved" in stdout + stderr
    step = RunFolder(out).saved_step()
    assert step >= 3
    saved = RunFolder(out).run_config()
    task = pretraining(**{**saved["config"], **saved["data"], "steps": 100000})
    resumed = Trainer(task, out, resume=True, log=lambda *_: None, progress=False)
    assert resumed.start == step


def test_sigkill_at_random_moments_never_leaves_an_unreadable_checkpoint(tmp_path):
    rng = random.Random(0)
    for trial in range(3):
        out = tmp_path / f"run{trial}"
        proc = _start(["--steps", "40", "--save-every", "2"], out)
        _wait_for_steps(out, 2, proc)
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the middle of steps and checkpoint writes
        proc.kill()
        proc.communicate()
        folder = RunFolder(out)
        if not (out / TRAIN_STATE).is_file():
            continue  # killed before the first checkpoint completed: nothing to resume, nothing damaged
        step = folder.saved_step()  # loads train_state.pt: never half-written
        assert step % 2 == 0 and step >= 2
        from igpt.checkpoint import load_run

        load_run(out)  # the inference files are complete too
        resumed = subprocess.run([sys.executable, "-m", "igpt.cli", *TRAIN_ARGS, "--steps", "40", "--save-every", "2",
                                  "--out", str(out), "--resume"], capture_output=True, text=True, env=os.environ)
        assert resumed.returncode == 0, resumed.stderr
        assert folder.saved_step() == 40
        steps = [r["step"] for r in folder.metrics() if "loss" in r]
        assert steps == list(range(1, 41))  # no step lost, none repeated


def test_a_failing_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import igpt.fileio as fileio

    out = tmp_path / "run"
    settings = dict(clusters=16, n_layer=1, n_embd=16, batch_size=16, steps=4, eval_every=1000, save_every=2,
                    sample_every=1000, eval_batches=1)
    trainer = Trainer(pretraining(**settings), out, log=lambda *_: None, progress=False)
    real_open = open
    saves = {"n": 0}

    def failing_open(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(f".tmp{os.getpid()}") and TRAIN_STATE in str(path):
            saves["n"] += 1
            if saves["n"] == 2:  # the second checkpoint hits a full disk halfway through
                handle = real_open(path, mode, *args, **kwargs)
                handle.write(b"partial")
                handle.close()
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(fileio, "open", failing_open, raising=False)
    with pytest.raises(IgptError, match="No space left on device"):
        trainer.run()
    monkeypatch.undo()
    assert RunFolder(out).saved_step() == 2  # the step-2 checkpoint is intact
    assert not [p for p in out.iterdir() if ".tmp" in p.name]  # no temporary file left behind
    resumed = Trainer(pretraining(**settings), out, resume=True, log=lambda *_: None, progress=False)
    assert resumed.start == 2
    resumed.run()
    assert RunFolder(out).saved_step() == 4


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {_Payload.marker}",))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused(tmp_path, capsys):
    from igpt.cli import main

    out = tmp_path / "run"
    Trainer(pretraining(clusters=16, n_layer=1, n_embd=16, batch_size=16, steps=2, eval_every=1000, save_every=2,
                        sample_every=1000, eval_batches=1), out, log=lambda *_: None, progress=False).run()
    _Payload.marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"step": 2, "best_val": 1.0, "model": {}, "optimizer": {}, "evil": _Payload()}, buffer)
    (out / TRAIN_STATE).write_bytes(buffer.getvalue())
    args = ["train", "--data", "digits", "--resolution", "8", "--clusters", "16", "--n-layer", "1", "--n-embd", "16",
            "--n-head", "2", "--batch-size", "16", "--steps", "2", "--eval-every", "1000", "--save-every", "2",
            "--sample-every", "1000", "--eval-batches", "1", *PAPER_FLAGS, "--out", str(out),
            "--resume"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "cannot be loaded safely" in err and len(err.strip().splitlines()) == 1
    assert not _Payload.marker.exists()


# ---- property tests: odd shapes, modes and values never crash ---------------------------------
PALETTE = Palette(np.random.default_rng(0).uniform(-1, 1, (37, 3)).astype(np.float32))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), gray=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_encode_decode_never_crash_and_are_idempotent(n, h, w, gray, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, h, w) if gray else (n, h, w, 3), dtype=np.uint8)
    tokens = PALETTE.encode(images)
    assert tokens.shape == (n, h * w) and tokens.max() < PALETTE.size
    once = PALETTE.decode(tokens, shape=(h, w))
    assert once.shape == (n, h, w, 3) and once.dtype == np.uint8
    again = PALETTE.decode(PALETTE.encode(once), shape=(h, w))
    np.testing.assert_array_equal(again, once)  # decode(encode(x)) is a fixed point after one round


MODES = ["1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I", "F", "LAB", "HSV"]


@settings(max_examples=60, deadline=None)
@given(mode=st.sampled_from(MODES), h=st.integers(1, 40), w=st.integers(1, 40), resolution=st.integers(1, 16),
       crop=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_any_image_mode_and_shape_becomes_rgb_at_the_resolution(mode, h, w, resolution, crop, seed):
    from igpt.data.images import fit_to, to_rgb

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(
        mode if mode not in ("I;16", "I", "F") else "L")
    if mode in ("I;16", "I", "F"):
        image = image.convert("I").convert(mode) if mode != "I;16" else Image.fromarray(
            rng.integers(0, 65536, (h, w), dtype=np.uint16))
    rgb = to_rgb(image)
    assert rgb.shape == (h, w, 3) and rgb.dtype == np.uint8
    fitted = fit_to(rgb, resolution, crop)
    assert fitted.shape == (resolution, resolution, 3) and fitted.dtype == np.uint8
    tokens = PALETTE.encode(fitted[None])
    assert tokens.shape == (1, resolution * resolution)


def test_a_decompression_bomb_is_refused_by_name(tmp_path):
    from igpt.data.images import decode

    path = tmp_path / "bomb.png"
    Image.new("L", (1, 1)).save(path)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 0.5  # every image counts as a bomb: the path a huge file takes
        with pytest.raises(IgptError, match="bomb.png"):
            decode(path, "bomb.png")
    finally:
        Image.MAX_IMAGE_PIXELS = limit
