"""Fine-tuning through the one training loop: exact resume after SIGKILL, early stopping, torchrun."""

import os
import subprocess
import sys

import pytest

from conftest import KILLED_AT_STEP_10
from igpt.checkpoint import RunFolder
from igpt.finetune import FinetuneConfig, Finetuning
from igpt.train import Trainer

SETTINGS = dict(batch_size=32, steps=12, eval_every=4, save_every=4, patience=100, lr=3e-3)
FLAGS = ["--batch-size", "32", "--steps", "12", "--eval-every", "4", "--save-every", "4", "--patience", "100",
         "--lr", "3e-3"]


def finetune(ckpt, out, resume=False, **changes):
    task = Finetuning(ckpt, FinetuneConfig(**{**SETTINGS, **changes}))
    Trainer(task, out, resume=resume, log=lambda *_: None, progress=False).run()
    return out


def step_losses(run) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunFolder(run).metrics() if "loss" in r}


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tiny_run, tmp_path):
    full = step_losses(finetune(tiny_run, tmp_path / "full"))
    cut = tmp_path / "cut"
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_STEP_10, "finetune", "--ckpt", str(tiny_run), *FLAGS,
                             "--out", str(cut)], capture_output=True, env=os.environ)
    assert killed.returncode == -9, killed.stderr
    assert RunFolder(cut).saved_step() == 8
    finetune(tiny_run, cut, resume=True)
    resumed = step_losses(cut)
    assert sorted(resumed) == sorted(full) == list(range(1, 13))
    for step in full:
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step
    assert (cut / "finetune.json").is_file() and RunFolder(cut).run_config()["kind"] == "finetune"


def test_early_stopping_ends_the_run_and_a_finished_run_stays_finished(tiny_run, tmp_path):
    out = finetune(tiny_run, tmp_path / "ft", lr=1e-12, patience=1, steps=40)  # no learning: no improvement
    steps = [r["step"] for r in RunFolder(out).metrics() if "loss" in r]
    assert steps == list(range(1, 9))  # validations at 4 (best) and 8 (no better): stop
    log = []
    Trainer(Finetuning(tiny_run, FinetuneConfig(**{**SETTINGS, "lr": 1e-12, "patience": 1, "steps": 40})), out,
            resume=True, log=log.append, progress=False).run()
    assert any("already complete" in line for line in log)


@pytest.mark.slow
def test_two_gloo_processes_match_one(tiny_run, tmp_path):
    common = ["finetune", "--ckpt", str(tiny_run), *FLAGS, "--steps", "4", "--device", "cpu", "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "igpt.cli", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env)
    assert single.returncode == 0, single.stderr
    dual = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           "29582", "-m", "igpt.cli", *common, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=env)
    assert dual.returncode == 0, dual.stderr[-3000:]
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5)
