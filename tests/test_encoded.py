"""OpenAI's encoded data sets: colour ids read as tokens without decoding, labels as indices or one-hot, pixels
decoded through the released palette where a command needs them, and `igpt eval` of a released-shape model."""

import json

import numpy as np
import pytest
import torch

from igpt import DataConfig, IgptError, ImageGPT, ImageGPTConfig, Palette
from igpt.cli import main


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("IGPT_CACHE", str(tmp_path / "cache"))


def write_set(folder, name="cifar10", sizes=(("tr", 20), ("va", 6), ("te", 8)), one_hot=("te",)):
    """Random ids of 32x32 images in the released palette, int64 as released; labels of 10 classes."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for code, n in sizes:
        ids, labels = rng.integers(0, 512, (n, 1024)), np.arange(n) % 10
        np.save(folder / f"{name}_{code}X.npy", ids)
        np.save(folder / f"{name}_{code}Y.npy", np.eye(10, dtype=np.float32)[labels] if code in one_hot else labels)
        written[code] = (ids, labels)
    return written


def test_the_ids_are_the_tokens_and_the_pixels_their_colours(tmp_path):
    written = write_set(tmp_path / "encoded")
    released = Palette.openai()
    described = DataConfig(name=str(tmp_path / "encoded"), resolution=32)
    for code, split in (("tr", "train"), ("va", "val"), ("te", "test")):
        tokens = described.tokens(split, released, require_labels=True)
        np.testing.assert_array_equal(tokens.tokens, written[code][0])
        np.testing.assert_array_equal(tokens.labels, written[code][1])  # one-hot rows become indices
        assert tokens.tokens.dtype == np.uint16 and tokens.classes == [str(i) for i in range(10)]
    pixels = described.images("test").images
    np.testing.assert_array_equal(pixels, released.decode(written["te"][0]).reshape(8, 32, 32, 3))
    by_file = DataConfig(name=str(tmp_path / "encoded" / "cifar10_teX.npy"), resolution=32).tokens("test", released)
    np.testing.assert_array_equal(by_file.tokens, written["te"][0])


def test_another_palette_or_size_reads_the_decoded_pixels(tmp_path):
    write_set(tmp_path / "encoded", sizes=(("tr", 20), ("te", 8)))  # no val: a seeded 10% of train
    smaller = DataConfig(name=str(tmp_path / "encoded"), resolution=16)
    released = Palette.openai()
    tokens = smaller.tokens("test", released)
    assert tokens.tokens.shape == (8, 256)
    np.testing.assert_array_equal(tokens.tokens, released.encode(smaller.images("test").images))
    full = DataConfig(name=str(tmp_path / "encoded"), resolution=32)
    assert len(full.tokens("train", released)) == 18 and len(full.tokens("val", released)) == 2
    fitted = Palette(np.random.default_rng(0).uniform(-1, 1, (16, 3)).astype(np.float32))
    assert int(full.tokens("test", fitted).tokens.max()) < 16


def test_eval_of_a_released_shape_model_on_an_encoded_set(tmp_path, capsys):
    written = write_set(tmp_path / "encoded")
    torch.manual_seed(0)
    model = ImageGPT(ImageGPTConfig(vocab_size=512, n_ctx=1024, n_embd=32, n_layer=1, n_head=2))
    with torch.no_grad():
        model.head.weight.normal_(std=0.1)
    model.save_pretrained(tmp_path / "model", palette=Palette.openai())
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(tmp_path / "model"), "--data", str(tmp_path / "encoded"), "--json",
                 str(out), "--precision", "fp32"]) == 0  # held to float32's loss at 1e-5
    ids = torch.from_numpy(written["te"][0])
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).item()
    assert json.loads(out.read_text())["nats_per_token"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("damage, match", [
    (lambda f: np.save(f / "cifar10_teX.npy", np.full((8, 1024), 600)), "colour ids outside 0..511"),
    (lambda f: np.save(f / "cifar10_teY.npy", np.arange(5)), "holds 5 labels"),
    (lambda f: np.save(f / "cifar10_teX.npy", np.zeros((8, 1000), np.int64)), "not one square image size"),
    (lambda f: np.save(f / "other_trX.npy", np.zeros((2, 1024), np.int64)), "holds the encoded sets cifar10, other"),
], ids=["ids beyond the palette", "label count", "not square", "two sets"])
def test_damaged_sets_are_refused_in_one_line(tmp_path, damage, match):
    write_set(tmp_path / "encoded")
    damage(tmp_path / "encoded")
    with pytest.raises(IgptError, match=match):
        DataConfig(name=str(tmp_path / "encoded"), resolution=32).tokens("test", Palette.openai())
    assert not list((tmp_path / "cache").glob("tokens/*/tokens.npy"))  # nothing half-written
