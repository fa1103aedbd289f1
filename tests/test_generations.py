"""Completing your own pictures, the filling-in animation and the surprise map."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import random_model, train
from igpt import completion_rows, load_run, pixel_bits, read_images
from igpt.animation import Animation
from igpt.cli import main
from igpt.data.images import decode, fit_to
from igpt.evaluate import LN2, evaluate
from igpt.grids import UNKNOWN, image_grid
from igpt.sample import sample


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Pictures of the sizes and modes users have: wide RGBA, tall grey, palette, 16-bit."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    wide = np.zeros((20, 30, 4), np.uint8)
    wide[..., 0], wide[:, 5:25, 2], wide[..., 3] = 255, 255, 255  # red margins left and right of a square
    wide[:, 5:25, 0] = 0
    Image.fromarray(wide, "RGBA").save(root / "wide.png")
    Image.fromarray(rng.integers(0, 256, (40, 12), dtype=np.uint8), "L").save(root / "tall.jpg")
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).convert("P").save(root / "palette.gif")
    Image.fromarray((rng.integers(0, 65536, (16, 16))).astype(np.uint16)).save(root / "deep.png")
    (root / "notes.png").write_text("not a picture")
    return root


def test_own_pictures_are_cropped_and_resized_as_training_data(photos):
    names = ["wide.png", "tall.jpg", "palette.gif", "deep.png"]
    images, skipped = read_images([photos / n for n in names], 8)
    assert images.shape == (4, 8, 8, 3) and images.dtype == np.uint8 and skipped == []
    for image, name in zip(images, names):
        np.testing.assert_array_equal(image, fit_to(decode(photos / name, name), 8, crop=True))
    assert (images[0] == [0, 0, 255]).all()  # the centre square of the wide picture, its red margins cut off


def test_complete_command_on_own_pictures(tiny_run, photos, tmp_path, capsys):
    paths = [str(photos / n) for n in ("wide.png", "tall.jpg", "notes.png", "deep.png")]
    out = tmp_path / "grid.png"
    assert main(["complete", "--ckpt", str(tiny_run), *paths, "--skip-bad", "--samples", "3", "--keep", "0.5",
                 "--out", str(out)]) == 0
    assert "1 unreadable files skipped" in capsys.readouterr().out
    rows = np.load(out.with_suffix(".npy"))
    assert rows.shape == (3, 5, 8, 8, 3)  # occluded input, 3 completions, original
    originals, _ = read_images([paths[0], paths[1], paths[3]], 8)
    np.testing.assert_array_equal(rows[:, -1], originals)
    assert (rows[:, 0, 4:] == UNKNOWN).all()
    np.testing.assert_array_equal(rows[:, 1:4, :4], np.repeat(rows[:, :1, :4], 3, axis=1))  # the top half kept
    assert main(["complete", "--ckpt", str(tiny_run), *paths, "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "notes.png" in err and not (tmp_path / "x.png").exists()


def test_completion_from_python_matches_the_command(tiny_run, photos, tmp_path):
    model, palette, _ = load_run(tiny_run, "cpu")
    images, _ = read_images([photos / "wide.png", photos / "deep.png"], model.config.side)
    rows = completion_rows(model, palette, images, keep_rows=3, samples=2, generator=torch.Generator().manual_seed(0))
    main(["complete", "--ckpt", str(tiny_run), str(photos / "wide.png"), str(photos / "deep.png"), "--keep-rows", "3",
          "--samples", "2", "--seed", "0", "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path / "g.png")])
    np.testing.assert_array_equal(rows, np.load(tmp_path / "g.npy"))


def test_animation_frames_come_from_the_decoding_loop(tiny_run, tmp_path):
    out = tmp_path / "s.png"
    assert main(["sample", "--ckpt", str(tiny_run), "--n", "5", "--batch-size", "2", "--seed", "1",
                 "--animate", str(tmp_path / "a.gif"), "--out", str(out)]) == 0
    images = np.load(out.with_suffix(".npy"))
    gif = Image.open(tmp_path / "a.gif")
    frames = []
    for i in range(gif.n_frames):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB")))
    # 8x8 images, a frame per row: the empty grid, then 8 rows of each of the 3 batches
    assert len(frames) == 1 + 3 * 8
    np.testing.assert_array_equal(frames[-1], image_grid(images))  # the last frame is the saved grid, exactly
    assert gif.info["loop"] == 0
    partial = np.full_like(images, UNKNOWN)
    partial[:2, :3] = images[:2, :3]  # first batch (images 0 and 1), three rows in
    np.testing.assert_array_equal(frames[3], image_grid(partial))


def test_completion_animation_shows_input_and_original(tiny_run, photos, tmp_path):
    assert main(["complete", "--ckpt", str(tiny_run), str(photos / "wide.png"), "--samples", "2", "--keep-rows", "5",
                 "--animate", str(tmp_path / "a.webp"), "--out", str(tmp_path / "c.png")]) == 0
    webp = Image.open(tmp_path / "a.webp")
    assert webp.n_frames == 1 + 3  # the cut, then rows 6, 7 and 8
    assert webp.size == Image.open(tmp_path / "c.png").size


def test_animation_python_api(tiny_run):
    model, palette, _ = load_run(tiny_run, "cpu")
    animation = Animation(palette, 3, 8, every_rows=4)
    tokens = sample(model, 3, generator=torch.Generator().manual_seed(0), watch=animation.watch)
    assert len(animation.frames) == 3  # empty, half, full
    np.testing.assert_array_equal(animation.frames[-1], image_grid(palette.decode(tokens.numpy())))


def test_autoregressive_surprise_is_the_exact_loss_per_pixel(tiny_run):
    model, palette, info = load_run(tiny_run, "cpu")
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, palette.size, (6, 64)))
    bits = pixel_bits(model, tokens, batch_size=4)
    assert bits.shape == (6, 8, 8)
    nats, count = evaluate(model, tokens.numpy(), objective="ar")
    assert count == 6 * 64 and math.isclose(bits.mean().item(), nats / LN2, rel_tol=1e-5)
    changed = tokens.clone()
    changed[:, 20] = (changed[:, 20] + 1) % palette.size
    moved = (pixel_bits(model, changed) - bits).abs().flatten(1).amax(0)
    assert moved[:20].max() == 0 and moved[20:].max() > 0  # a pixel's surprise depends on the pixels before it


def test_bert_surprise_predicts_every_pixel_from_the_rest():
    model = random_model("bert")
    side, vocab = model.config.side, model.config.vocab_size
    tokens = torch.from_numpy(np.random.default_rng(0).integers(0, vocab, (2, side * side)))
    bits = pixel_bits(model, tokens, rounds=3, seed=5)
    assert bits.shape == (2, side, side) and torch.isfinite(bits).all() and (bits > 0).all()
    torch.testing.assert_close(pixel_bits(model, tokens, rounds=3, seed=5), bits)
    assert not torch.equal(pixel_bits(model, tokens, rounds=1, seed=6), pixel_bits(model, tokens, rounds=1, seed=5))


def test_surprise_command(tiny_run, photos, tmp_path, capsys):
    out, report = tmp_path / "map.png", tmp_path / "map.json"
    assert main(["surprise", "--ckpt", str(tiny_run), str(photos / "wide.png"), str(photos / "tall.jpg"),
                 "--out", str(out), "--json", str(report)]) == 0
    assert "bits/pixel" in capsys.readouterr().out
    result = json.loads(report.read_text())
    assert len(result["bits_per_pixel"]) == 2 and np.asarray(result["pixel_bits"]).shape == (2, 8, 8)
    assert math.isclose(np.mean(result["pixel_bits"][1]), result["bits_per_pixel"][1], rel_tol=1e-6)
    assert main(["surprise", "--ckpt", str(tiny_run), "--n", "1", "--out", str(tmp_path / "one.png")]) == 0
    assert Image.open(out).size[1] > 1.8 * Image.open(tmp_path / "one.png").size[1]  # a row per image


def test_bert_runs_refuse_to_sample_or_animate_but_show_surprise(tmp_path, capsys):
    run = train(tmp_path / "bert", objective="bert", steps=2)
    capsys.readouterr()
    for command in (["sample", "--animate", str(tmp_path / "a.gif")], ["complete", "--animate", str(tmp_path / "b.gif")]):
        assert main([command[0], "--ckpt", str(run), *command[1:], "--out", str(tmp_path / "s.png")]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "bert" in err
    assert not any(p.suffix in (".gif", ".png") for p in tmp_path.iterdir())
    assert main(["surprise", "--ckpt", str(run), "--n", "2", "--out", str(tmp_path / "m.png")]) == 0
