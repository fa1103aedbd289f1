"""Defaults that fit the data: `igpt train` with no other flag takes the resolution, the palette size and a
budget from the data (igpt.plan, the judgement the demo starts from too); explicit flags win; the digits
train as before."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from igpt.cli import build_parser, main
from igpt.config import given_flags
from igpt.data import DataConfig
from igpt.palette import Palette, colour_codes
from igpt.plan import budget_minutes, palette_size
from igpt.precision import resolve_precision
from igpt.pretrain import PretrainConfig, Pretraining, planned

TINY_FLAGS = ["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--batch-size", "8", "--eval-batches", "1"]


def write_folder(root, side: int, picture, jpeg: bool = False) -> str:
    """40 RGB images side x side in two class folders, each drawn by picture(rng, y, x, c), as PNG (with `jpeg`,
    every other one as JPEG)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:side, 0:side] / (side - 1)
    for c, name in enumerate(("warm", "cool")):
        (root / name).mkdir(parents=True)
        for i in range(20):
            image = Image.fromarray(picture(rng, y, x, c))
            image.save(root / name / (f"{i}.jpg" if jpeg and i % 2 else f"{i}.png"))
    return str(root)


def gradient_with_a_disc(rng, y, x, c) -> np.ndarray:
    """A smooth colour gradient (a different one per class) with a disc of one colour on it: a photo's colours."""
    a, b = rng.uniform(0.2, 1.0, 2)
    base = np.stack([a * x, b * y, 0.5 * (x + y)], -1) if c == 0 else np.stack([0.3 * y, b * x, a * (1 - y)], -1)
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    base[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.uniform(0, 1, 3)
    return (255 * base).astype(np.uint8)


COLOURS = np.array([[250, 240, 230], [200, 30, 30], [30, 160, 40], [20, 40, 200], [240, 200, 0], [20, 20, 20]],
                   dtype=np.uint8)


def flat_shapes(rng, y, x, c) -> np.ndarray:
    """A background and a rectangle in two of six flat colours: drawings with few colours."""
    image = np.empty((*y.shape, 3), dtype=np.uint8)
    background, shape = rng.choice(len(COLOURS), 2, replace=False)
    image[:] = COLOURS[background]
    top, left = rng.integers(0, y.shape[0] // 2, 2)
    image[top : top + y.shape[0] // 3 + 2 * c, left : left + y.shape[0] // 3] = COLOURS[shape]
    return image


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("photos") / "photos", 48, gradient_with_a_disc, jpeg=True)


def distinct_colours(images: np.ndarray) -> int:
    return len(np.unique(colour_codes(images, rgb=True)))


def train_settings(*flags: str) -> tuple[DataConfig, PretrainConfig]:
    """What `igpt train FLAGS` trains: the flags as the command reads them, then the plan."""
    args = build_parser().parse_args(["train", "--out", "unused", *flags])
    task = Pretraining(*planned(given_flags(DataConfig, args), given_flags(PretrainConfig, args)))
    return task.data, task.cfg


def test_colour_photos_train_at_the_papers_32x32_with_its_512_colours_for_minutes(photos):
    data, cfg = train_settings("--data", photos)
    assert data.resolution == 32  # the photos are 48x48: the paper's size, no larger
    assert distinct_colours(data.images("train").images) > 512  # so a colour per pixel, up to the paper's 512
    assert cfg.clusters == 512
    assert cfg.minutes == 4.0 and cfg.steps is None and cfg.epochs is None  # 40 photos: the shortest budget


def test_a_folder_of_small_drawings_keeps_their_size_and_their_few_colours(tmp_path):
    data, cfg = train_settings("--data", write_folder(tmp_path / "drawings", 24, flat_shapes))
    assert data.resolution == 24  # never blown up
    assert cfg.clusters == distinct_colours(data.images("train").images) == len(COLOURS)


def test_the_digits_train_as_before():
    """Before the plan, `igpt train --data digits` read 8x8 digits (DataConfig's default) with a 512-colour fit,
    which keeps the digits' 17 grey levels: the plan gives the same resolution and palette, and a budget."""
    data, cfg = train_settings("--data", "digits")
    train = data.images("train").images
    assert data.resolution == 8 and cfg.clusters == Palette.fit(train, clusters=512).size == 17
    assert cfg.minutes == 4.0


def test_explicit_flags_win(photos):
    data, cfg = train_settings("--data", photos, "--resolution", "8", "--clusters", "8", "--epochs", "2")
    assert (data.resolution, cfg.clusters, cfg.epochs, cfg.minutes, cfg.steps) == (8, 8, 2.0, None, None)
    for length, value in (("--steps", 5), ("--minutes", 1.5)):
        _, cfg = train_settings("--data", photos, length, str(value))
        assert cfg.clusters == 512 and (cfg.steps, cfg.minutes) == ((5, None) if length == "--steps" else (None, 1.5))
    data, cfg = train_settings("--data", photos, "--palette", "openai")
    assert data.resolution == 32 and cfg.clusters is None  # the released palette has its own size


def test_a_run_resumes_with_the_plan_it_recorded(photos, tmp_path):
    """--resume takes the resolution, palette size and budget the run recorded, not a new plan: a run made
    before the plan existed (8x8, 512 colours, one epoch) resumes with the command that made it."""
    run = tmp_path / "old"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({
        "kind": "pretrain", "data": {"name": photos, "data_dir": None, "crop": False, "skip_bad": False,
                                     "resolution": 8},
        "config": {"clusters": 512, "steps": None, "epochs": None, "minutes": None}, "step": 3}))
    data, cfg = planned({"name": photos}, {}, run)
    assert (data.resolution, cfg.clusters, cfg.steps, cfg.epochs, cfg.minutes) == (8, 512, None, None, None)
    data, cfg = planned({"name": photos, "resolution": 16}, {"clusters": 8, "steps": 4}, run)
    assert (data.resolution, cfg.clusters, cfg.steps, cfg.minutes) == (16, 8, 4, None)  # flags still win


def test_the_demo_sizes_a_folder_as_before_from_the_same_judgement(photos, tmp_path):
    """The demo's plan for images it has no hand-made plan for: igpt.plan's, at most 16x16 with 20 minutes."""
    from igpt.demo import plan_for

    plan = plan_for(photos)
    assert (plan.data.resolution, plan.pretrain.clusters, plan.budget_minutes) == (16, 256, 20.0)
    drawings = plan_for(write_folder(tmp_path / "drawings", 12, flat_shapes))
    assert (drawings.data.resolution, drawings.pretrain.clusters) == (12, len(COLOURS))  # never blown up


def test_the_palette_and_budget_rules():
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (8, 4, 4, 3), dtype=np.uint8)
    assert palette_size(noise) == 16  # 16 pixels an image, but never fewer than 16 colours
    assert palette_size(np.zeros((3, 64, 64, 3), dtype=np.uint8)) == 1  # one colour is all there is
    assert palette_size(rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)) == 512  # never more than the paper's
    assert budget_minutes(40, 32) == 4.0 and budget_minutes(1_000, 32) == pytest.approx(10.24)
    assert budget_minutes(50_000, 32) == 20.0


def test_igpt_train_prints_its_plan_and_records_it(tmp_path, capsys, monkeypatch):
    """The command on 16x16 drawings with only a tiny model and a budget: the plan line before the first step, and
    the run's files with the planned resolution and palette. A step is timed at two minutes, so that the budget
    sizes a run of a few steps however busy the machine is (and the sample grids, 16x16, stay short)."""
    import igpt.train as train_module

    monkeypatch.setattr(train_module, "median_seconds", lambda *args, **kwargs: 120.0)
    folder = write_folder(tmp_path / "shapes", 16, flat_shapes)
    run = tmp_path / "run"
    command = ["train", "--data", folder, "--out", str(run), "--minutes", "10", *TINY_FLAGS]
    assert main(command) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("plan: ")]
    assert len(lines) == 1
    info, config = json.loads((run / "run.json").read_text()), json.loads((run / "config.json").read_text())
    colours, steps = config["vocab_size"], info["config"]["steps"]
    assert info["data"]["resolution"] == 16 and config["n_ctx"] == 16 * 16  # their own size
    assert info["config"]["clusters"] == colours == len(np.load(run / "palette.npy")) == len(COLOURS)
    assert info["config"]["minutes"] == 10 and 1 <= steps <= 5
    precision = resolve_precision("auto", torch.device("cpu"))
    assert lines[0] == (f"plan: shapes at 16x16, {colours}-colour palette, tiny model (1 layer, width 16, 2d positions, "
                        f"strided attention), ar objective; {precision}; {steps} steps of batch 8, about "
                        f"{lines[0].rsplit('about ', 1)[1]}")
    assert lines[0].endswith(" minutes")
    assert main([*command, "--resume"]) == 0  # the same command continues it
    assert f"run already complete at step {steps}" in capsys.readouterr().out
