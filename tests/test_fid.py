"""FID and KID: the arithmetic against closed forms, `igpt fid` end to end with a small feature
network in Inception's place (no weights needed), the offline message and the bad-input lines."""

from __future__ import annotations

import importlib
import json
import shutil
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics")

from igpt import fid  # noqa: E402
from igpt.cli import main  # noqa: E402
from conftest import run_refused  # noqa: E402


def closed_form_fid(a: np.ndarray, b: np.ndarray) -> float:
    """|m1 - m2|^2 + Tr(C1 + C2 - 2 (C1 C2)^1/2) from the sample means and covariances."""
    from scipy import linalg

    c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(c1 @ c2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * root))


def gaussian(rng, mean, std, n: int) -> torch.Tensor:
    return torch.from_numpy(rng.normal(mean, std, size=(n, len(mean))))


def test_fid_of_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    a = gaussian(rng, [0.0, 0.0, 0.0], 1.0, 20_000)
    b = gaussian(rng, [1.0, 2.0, 0.0], 1.0, 20_000)
    result = fid.scores(a, b, kid_subsets=2, kid_subset_size=100)
    assert result["fid"] == pytest.approx(closed_form_fid(a.numpy(), b.numpy()), rel=1e-6)
    assert result["fid"] == pytest.approx(5.0, abs=0.15)  # equal covariances: |mu1 - mu2|^2

    a = gaussian(rng, [0.0, 0.0, 0.0], [1.0, 2.0, 3.0], 20_000)
    b = gaussian(rng, [0.0, 0.0, 0.0], [2.0, 2.0, 1.0], 20_000)
    result = fid.scores(a, b, kid_subsets=2, kid_subset_size=100)
    assert result["fid"] == pytest.approx(closed_form_fid(a.numpy(), b.numpy()), rel=1e-6)
    assert result["fid"] == pytest.approx(5.0, abs=0.15)  # diagonal covariances: sum of (s1 - s2)^2


def polynomial_mmd(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased MMD^2 with KID's kernel (x.y / d + 1)^3, over every pair."""
    d = x.shape[1]

    def k(u, v):
        return (u @ v.T / d + 1) ** 3

    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.mean())


def kernel_mean(a: np.ndarray, b: np.ndarray) -> float:
    """E[(x.y / d + 1)^3] for independent x ~ N(a, I), y ~ N(b, I), from the Gaussian moments."""
    d = len(a)
    eye = np.eye(d)

    def third(m):  # E[x_i x_j x_k] = m_i m_j m_k + m_i d_jk + m_j d_ik + m_k d_ij
        return (np.einsum("i,j,k->ijk", m, m, m) + np.einsum("i,jk->ijk", m, eye) + np.einsum("j,ik->ijk", m, eye)
                + np.einsum("k,ij->ijk", m, eye))

    s1 = a @ b
    s2 = d + a @ a + b @ b + s1 ** 2
    s3 = (third(a) * third(b)).sum()
    return s3 / d ** 3 + 3 * s2 / d ** 2 + 3 * s1 / d + 1


def test_kid_is_the_unbiased_polynomial_mmd():
    rng = np.random.default_rng(1)
    a = gaussian(rng, [0.0, 0.0, 0.0], 1.0, 300)
    b = gaussian(rng, [0.5, 0.0, -0.5], 1.0, 300)
    result = fid.scores(a, b, kid_subsets=3, kid_subset_size=300)  # every feature in every subset: exact
    assert result["kid_mean"] == pytest.approx(polynomial_mmd(a.numpy(), b.numpy()), rel=1e-9)
    assert result["kid_std"] == pytest.approx(0.0, abs=1e-12)


def test_kid_of_gaussians_meets_the_population_value():
    rng = np.random.default_rng(2)
    mean_a, mean_b = np.array([0.0, 0.0, 0.0]), np.array([1.0, 0.0, -1.0])
    population = kernel_mean(mean_a, mean_a) + kernel_mean(mean_b, mean_b) - 2 * kernel_mean(mean_a, mean_b)
    a, b = gaussian(rng, mean_a, 1.0, 2000), gaussian(rng, mean_b, 1.0, 2000)
    result = fid.scores(a, b, kid_subsets=10, kid_subset_size=500)
    assert abs(result["kid_mean"] - population) < 2 * result["kid_std"]  # the spread of single subsets

    same = fid.scores(a, gaussian(rng, mean_a, 1.0, 2000), kid_subsets=10, kid_subset_size=500)
    assert abs(same["kid_mean"]) < 2 * same["kid_std"] and abs(same["kid_mean"]) < 0.01 * population


def test_kid_takes_100_subsets_of_1000_or_of_the_smaller_set():
    rng = np.random.default_rng(3)
    result = fid.scores(gaussian(rng, [0.0, 0.0], 1.0, 40), gaussian(rng, [0.0, 0.0], 1.0, 30), seed=5)
    assert (result["kid_subsets"], result["kid_subset_size"]) == (100, 30)
    assert fid.scores(gaussian(rng, [0.0, 0.0], 1.0, 40), gaussian(rng, [0.0, 0.0], 1.0, 30), seed=5) != result
    assert fid.scores(gaussian(rng, [0.0], 1.0, 1001), gaussian(rng, [0.0], 1.0, 1002), kid_subsets=1)[
        "kid_subset_size"] == 1000


class ColourLayout(torch.nn.Module):
    """A small stand-in for Inception with torchmetrics' custom-feature contract: uint8 (N, 3, H, W) ->
    features (N, 12), each channel's mean over the quarters of the image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3, (x.dtype, x.shape)
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 2).flatten(1)


@pytest.fixture
def small_network(monkeypatch):
    """`igpt fid` with ColourLayout where the Inception network goes; records what it was asked for."""
    asked = []

    def network(dims=2048, weights=None):
        fid.check_dims(dims)
        asked.append((dims, weights))
        return ColourLayout()

    monkeypatch.setattr(fid, "inception", network)
    return asked


@pytest.fixture
def no_sampling(monkeypatch):
    """Fails the test if anything samples: for refusals that must come before that work."""
    def refuse(*args, **kwargs):
        raise AssertionError("sampling started")

    monkeypatch.setattr(importlib.import_module("igpt.sample"), "sample", refuse)  # the module, not igpt.sample()


def test_fid_of_samples_end_to_end(tiny_run, small_network, tmp_path, capsys):
    out = tmp_path / "fid.json"
    assert main(["fid", "--ckpt", str(tiny_run), "--n", "24", "--batch-size", "8", "--dims", "64",
                 "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert small_network == [(64, None)]
    assert {k: result[k] for k in ("n", "dims", "split", "data", "resolution", "kid_subset_size", "skipped")} == {
        "n": 24, "dims": 64, "split": "test", "data": "digits", "resolution": 8, "kid_subset_size": 24, "skipped": 0}
    assert result["source"] == f"samples of {tiny_run}"
    assert np.isfinite(result["fid"]) and result["fid"] > 0.01 and np.isfinite(result["kid_std"])
    assert "FID" in printed and "KID" in printed and "subsets of 24" in printed and str(out) in printed

    again = tmp_path / "again.json"
    assert main(["fid", "--ckpt", str(tiny_run), "--n", "24", "--batch-size", "8", "--dims", "64",
                 "--json", str(again)]) == 0
    assert json.loads(again.read_text())["fid"] == pytest.approx(result["fid"], rel=1e-9)  # seeded


def test_fid_of_images_end_to_end(tiny_run, small_network, tmp_path, capsys):
    from PIL import Image

    from igpt.data import DataConfig

    test = np.asarray(DataConfig(name="digits", resolution=8).images("test").images)
    np.save(tmp_path / "test.npy", test)
    out = tmp_path / "same.json"
    assert main(["fid", "--ckpt", str(tiny_run), "--images", str(tmp_path / "test.npy"), "--json", str(out)]) == 0
    same = json.loads(out.read_text())
    assert same["n"] == len(test) and same["source"] == str(tmp_path / "test.npy")
    assert abs(same["fid"]) < 1e-6  # the split against itself

    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, image in enumerate(test[:6]):  # larger than the model's 8x8: resized as training data are
        Image.fromarray(image).resize((32, 32), Image.NEAREST).save(folder / f"{i}.png")
    (folder / "notes.png").write_text("this is not an image")
    capsys.readouterr()
    out = tmp_path / "folder.json"
    assert main(["fid", "--images", str(folder), "--data", "digits", "--resolution", "8", "--skip-bad",
                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 6 and result["skipped"] == 1 and result["kid_subset_size"] == 6
    assert "1 unreadable files skipped" in capsys.readouterr().out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_run):
    from PIL import Image

    root = tmp_path_factory.mktemp("fid-inputs")
    bert = shutil.copytree(tiny_run, root / "bert")
    config = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**config, "objective": "bert"}))
    bad = root / "bad"
    bad.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(bad / "good.png")
    (bad / "text.png").write_text("this is not an image")
    np.save(root / "floats.npy", np.zeros((4, 8, 8, 3), np.float32))
    np.save(root / "six.npy", np.zeros((6, 8, 8, 3), np.uint8))
    (root / "a-file").write_text("x")
    return {"run": tiny_run, "bert": bert, "bad": bad, "floats": root / "floats.npy", "six": root / "six.npy",
            "a-file": root / "a-file"}


BAD = [
    ("fid --ckpt {run} --n 1", "--n must be at least 2"),
    ("fid --ckpt {run} --n 100000", "more than digits test has"),
    ("fid --ckpt {run} --n 100000 --split val", "more than digits val has"),
    ("fid --ckpt {run} --n x", "--n"),
    ("fid --ckpt {run} --dims 100", "--dims must be one of 64, 192, 768, 2048"),
    ("fid --ckpt {bert} --n 4", "bert"),
    ("fid --ckpt {run} --images {bad}", "text.png"),
    ("fid --ckpt {run} --images {floats}", "uint8"),
    ("fid --ckpt {run} --images {six} --n 7", "more than --images"),
    ("fid --ckpt {run} --images {a-file}", "a folder of images or an .npy"),
    ("fid --images {six}", "needs --data and --resolution"),
    ("fid --n 4", "--ckpt"),
    ("fid --ckpt {run} --json out.txt", ".json"),
    ("fid --ckpt {run} --resolution 16", "--resolution 16"),
    ("fid --ckpt missing", "not a folder"),
    ("fid --ckpt {run} --n 4 --json {a-file}/fid.json", "is a file"),
]


@pytest.mark.parametrize("line, words", BAD, ids=[words for _, words in BAD])
def test_bad_input_is_one_line(line, words, inputs, small_network, no_sampling, tmp_path, monkeypatch, capsys):
    err = run_refused(line.format(**inputs).split(), tmp_path, monkeypatch, capsys)
    assert words in err, err


class BrokenImport:
    """An import that fails as torch-fidelity's does beside a torchvision built for another torch."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch_fidelity":
            raise RuntimeError("operator torchvision::nms does not exist")


@pytest.mark.parametrize("missing", ["torch_fidelity", "torchmetrics", "broken torch_fidelity"])
def test_without_the_packages_one_line_says_what_to_install(missing, tiny_run, no_sampling, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    if missing.startswith("broken"):
        monkeypatch.delitem(sys.modules, "torch_fidelity", raising=False)
        monkeypatch.setattr(sys, "meta_path", [BrokenImport(), *sys.meta_path])
    else:
        monkeypatch.setitem(sys.modules, missing, None)
    work = tmp_path / "work"
    work.mkdir()
    err = run_refused(["fid", "--ckpt", str(tiny_run), "--n", "4"], work, monkeypatch, capsys)
    assert fid.WEIGHTS_FILE in err and "--fid-weights" in err  # offline, the weights are missing too
    if missing.startswith("broken"):
        assert "torchvision::nms" in err and f"{fid.matching_torchvision()}, the one built for torch" in err
    else:
        assert "pip install 'igpt[fid]' \"torch==" in err  # the pin that keeps the user's torch


def test_offline_without_weights_one_line_names_the_file(tiny_run, no_sampling, tmp_path, monkeypatch, capsys):
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(fid, "missing_packages", lambda: None)
    monkeypatch.setattr(fid, "WEIGHTS_URL", (tmp_path / "unreachable" / fid.WEIGHTS_FILE).as_uri())
    work = tmp_path / "work"
    work.mkdir()
    err = run_refused(["fid", "--ckpt", str(tiny_run), "--n", "4"], work, monkeypatch, capsys)
    assert fid.WEIGHTS_FILE in err and str(home / "hub" / "checkpoints") in err and "--fid-weights" in err
    assert not home.exists() or not any(home.rglob("*.pth*"))

    err = run_refused(["fid", "--ckpt", str(tiny_run), "--n", "4", "--fid-weights", str(tmp_path / "nothing.pth")],
                      work, monkeypatch, capsys)
    assert "--fid-weights" in err and "nothing.pth" in err


def test_demo_scores_its_samples_only_when_inception_is_here(tiny_run, monkeypatch):
    from igpt.checkpoint import load_run
    from igpt.demo import score_sample_quality

    model, palette, info = load_run(tiny_run, "cpu")
    data = info.data_for(model.config)
    monkeypatch.setattr(fid, "unavailable", lambda: "no weights here")
    assert score_sample_quality(model, palette, data, seed=0) == {"skipped": "no weights here"}
    monkeypatch.setattr(fid, "unavailable", lambda: None)
    monkeypatch.setattr(fid, "inception", lambda dims=2048, weights=None: ColourLayout())
    result = score_sample_quality(model, palette, data, seed=0)
    assert result["n"] == min(500, len(data.images("test"))) and result["dims"] == 2048
    assert np.isfinite(result["fid"]) and result["fid"] >= 0 and result["sampled"]


def test_unavailable_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(fid, "missing_packages", lambda: "FID and KID need torchmetrics and torch-fidelity: pip ...")
    assert "torch-fidelity" in fid.unavailable()
    monkeypatch.setattr(fid, "missing_packages", lambda: None)
    monkeypatch.setattr(fid, "weights_dir", lambda: tmp_path)
    assert fid.WEIGHTS_FILE in fid.unavailable() and str(tmp_path) in fid.unavailable()
    (tmp_path / fid.WEIGHTS_FILE).write_bytes(b"weights")
    assert fid.unavailable() is None
