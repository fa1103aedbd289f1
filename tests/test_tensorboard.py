"""TensorBoard event files, written by torch's SummaryWriter and read back by tensorboard's own reader;
without the tensorboard package a run still logs metrics.jsonl and says once how to get event files."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from igpt.checkpoint import RunFolder
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.palette import Palette

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def record(step: int) -> dict:
    return {"step": step, "loss": 1.0 / step, "lr": 0.5, "note": "not a number"}


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    events = event_accumulator.EventAccumulator(str(folder)).Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_every_numeric_metric_becomes_a_scalar(tmp_path):
    with RunFolder(tmp_path) as folder:
        for step in (1, 2, 3):
            folder.log_metrics(record(step))
    logged = scalars(tmp_path)
    assert set(logged) == {"loss", "lr"}
    assert logged["loss"] == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]


def test_a_resumed_run_replaces_the_steps_past_its_checkpoint(tmp_path, monkeypatch):
    """Even within the same second and process: event file names end in a per-process counter, and counter 10
    sorts before 9, so TensorBoard would read the resumed file first and the killed run's steps 3 and 4 after
    its purge (this test failed now and then in the full suite until the writer waited for the next second)."""
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    with RunFolder(tmp_path) as killed:
        for step in (1, 2, 3, 4):
            killed.log_metrics(record(step))
    with RunFolder(tmp_path) as resumed:
        resumed.trim_metrics(2)  # the checkpoint was at step 2
        for step in (3, 4):
            resumed.log_metrics({**record(step), "loss": 10.0 * step})
    names = sorted(p.name for p in tmp_path.glob("events.out.tfevents.*"))
    assert names[-1].endswith(".10")  # the resumed run's file is read last
    assert scalars(tmp_path)["loss"] == [(1, 1.0), (2, 0.5), (3, 30.0), (4, 40.0)]


def test_a_checkpoint_writes_out_the_curve_so_far(tmp_path):
    folder = RunFolder(tmp_path)
    folder.log_metrics(record(1))
    model = ImageGPT(ImageGPTConfig(vocab_size=4, n_ctx=4, n_embd=8, n_layer=1, n_head=1))
    palette = Palette(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3))
    folder.save(model, palette, {"step": 1}, {"step": 1, "model": model.state_dict(), "optimizer": {}})
    assert scalars(tmp_path)["loss"] == [(1, 1.0)]  # on disk before close(), as after a kill
    folder.close()


def test_without_tensorboard_runs_log_metrics_and_say_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when it is not installed
    with RunFolder(tmp_path) as folder:
        for step in (1, 2, 3):
            folder.log_metrics(record(step))
    assert [r["step"] for r in RunFolder(tmp_path).metrics()] == [1, 2, 3]
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1 and "pip install 'igpt[tensorboard]'" in messages[0]
