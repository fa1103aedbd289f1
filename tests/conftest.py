"""Shared test setup: one data cache for the whole session, and one tiny pretraining run.

Every test (and every subprocess it starts) reads and writes data caches under one
session-wide IGPT_CACHE, never the user's ~/.cache/igpt.
"""

from __future__ import annotations

import shutil

import pytest

TINY = {"n_layer": 2, "n_embd": 32, "n_head": 2}  # a two-layer, width-32 model: seconds to train
TINY_RUN = dict(batch_size=32, steps=12, lr=3e-3, eval_every=6, save_every=4, sample_every=12, eval_batches=2, **TINY)


@pytest.fixture(scope="session", autouse=True)
def igpt_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        cache = tmp_path_factory.mktemp("igpt-cache")
        patch.setenv("IGPT_CACHE", str(cache))
        yield cache


def pretraining(data: str = "digits", **changes):
    """A pretraining task on `data` at 8x8 with the tiny run's settings, changed by `changes`
    (DataConfig and PretrainConfig fields)."""
    import dataclasses

    from igpt.data import DataConfig
    from igpt.pretrain import PretrainConfig, Pretraining

    data_fields = {field.name for field in dataclasses.fields(DataConfig)}
    described = {"name": data, "resolution": 8, **{k: v for k, v in changes.items() if k in data_fields}}
    settings = {**TINY_RUN, **{k: v for k, v in changes.items() if k not in data_fields}}
    return Pretraining(DataConfig(**described), PretrainConfig(**settings))


def train(out, resume: bool = False, **changes):
    """Train (or resume) a tiny run into `out`; returns the folder."""
    from igpt.train import Trainer

    Trainer(pretraining(**changes), out, resume=resume, log=lambda *_: None, progress=False).run()
    return out


def random_model(objective: str = "ar", **changes):
    """A 3-layer model on 5x5 images whose weights are all perturbed (the released init zeroes the head),
    so every output depends on every weight."""
    import torch

    from igpt.model import ImageGPT, ImageGPTConfig

    torch.manual_seed(0)
    config = dict(vocab_size=13, n_ctx=25, n_embd=32, n_layer=3, n_head=4, objective=objective)
    model = ImageGPT(ImageGPTConfig(**{**config, **changes}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


KILLED_AT_STEP_10 = (
    "import os, signal, sys\n"
    "from igpt.checkpoint import RunFolder\n"
    "log = RunFolder.log_metrics\n"
    "def killing(self, record):\n"
    "    log(self, record)\n"
    "    if record.get('step') == 10: os.kill(os.getpid(), signal.SIGKILL)\n"
    "RunFolder.log_metrics = killing\n"
    "from igpt.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)  # `python -c KILLED_AT_STEP_10 COMMAND ...`: the igpt command, SIGKILLed once it has logged step 10


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished tiny run on digits 8x8 (12 steps, 17-colour palette). Read it, never change it: see `tiny_copy`."""
    return train(tmp_path_factory.mktemp("tiny") / "run")


@pytest.fixture
def tiny_copy(tiny_run, tmp_path):
    """A private copy of the tiny run, for tests that change or damage it."""
    return shutil.copytree(tiny_run, tmp_path / "run")


def run_refused(argv: list[str], cwd, monkeypatch, capsys) -> str:
    """Run `igpt` in the empty folder `cwd`: it must refuse with a non-zero exit and one line on stderr
    (no traceback), leaving nothing behind; returns that line."""
    from igpt.cli import main

    monkeypatch.chdir(cwd)
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    err = capsys.readouterr().err.strip()
    assert code not in (0, None), argv
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert list(cwd.iterdir()) == [], f"{argv} left {list(cwd.iterdir())}"
    return err
