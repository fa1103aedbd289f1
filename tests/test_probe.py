"""Linear probes, fine-tuning and classification."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from igpt.errors import IgptError
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.probe import (
    LabelledSplit,
    LogisticRegression,
    Protocols,
    Standardizer,
    extract_features,
    feature_batch_size,
    few_label_draws,
    gain_text,
    linear_probe,
    paired_gain,
    parse_layers,
    probe_features,
    probe_few_labels,
    summary,
)


def _digits_features(n_layer=2):
    """Features of a random 2-layer model on scikit-learn's digits, with labels, split 3 ways."""
    from sklearn.datasets import load_digits

    from igpt.palette import Palette

    digits = load_digits()
    pixels = np.repeat((digits.images * 255 / 16).astype(np.uint8)[..., None], 3, axis=-1)
    palette = Palette.fit(pixels, clusters=16, seed=0)
    tokens = palette.encode(pixels)
    torch.manual_seed(0)
    model = ImageGPT(ImageGPTConfig(vocab_size=palette.size, n_ctx=64, n_embd=32, n_layer=n_layer, n_head=2))
    return model, tokens, pixels, digits.target


def test_logistic_regression_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression as SkLogisticRegression

    model, tokens, _, labels = _digits_features()
    features = extract_features(model, tokens, [1])[1]
    x_train, y_train, x_test, y_test = features[:1200], labels[:1200], features[1200:], labels[1200:]
    scale = Standardizer.fit(x_train)
    for l2 in (1e-2, 1e-3):
        ours = LogisticRegression(l2).fit(scale(x_train), torch.as_tensor(y_train), 10)
        ref = SkLogisticRegression(C=1 / (l2 * len(x_train)), max_iter=5000, tol=1e-8)
        ref.fit(scale(x_train).numpy(), y_train)
        ours_acc = ours.accuracy(scale(x_test), torch.as_tensor(y_test))
        ref_acc = ref.score(scale(x_test).numpy(), y_test)
        assert ours_acc > 0.25  # well above chance (0.1), from a random 2-layer model
        assert abs(ours_acc - ref_acc) <= 0.01, (l2, ours_acc, ref_acc)
        probs = torch.softmax(ours.logits(scale(x_test)), 1).numpy()
        assert np.abs(probs - ref.predict_proba(scale(x_test).numpy())).max() < 1e-2


def test_extract_features_streams_the_same_numbers_as_one_pass():
    model, tokens, _, _ = _digits_features()
    model.eval()
    streamed = extract_features(model, tokens[:50], [0, 1, 2], batch_size=7)
    with torch.no_grad():
        whole = model.features(torch.from_numpy(tokens[:50].astype(np.int64)), [0, 1, 2])
    for layer in (0, 1, 2):
        assert streamed[layer].dtype == np.float32 and streamed[layer].shape == (50, 32)
        np.testing.assert_allclose(streamed[layer], whole[layer].numpy(), atol=1e-5)


def test_the_default_pass_is_sized_by_pixels_on_a_cpu_and_by_images_on_a_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert [feature_batch_size(side * side, cpu) for side in (8, 16, 32, 64, 128, 256)] == [128, 32, 8, 2, 1, 1]
    assert feature_batch_size(32 * 32, gpu) == feature_batch_size(8 * 8, gpu) == 256


def test_bert_models_are_probed_unmasked():
    model, tokens, _, _ = _digits_features()
    bert = ImageGPT(dataclasses.replace(model.config, objective="bert"))
    bert.load_state_dict(model.state_dict())
    bert.eval()
    first = extract_features(bert, tokens[:8], [2])[2]
    again = extract_features(bert, tokens[:8], [2])[2]
    np.testing.assert_array_equal(first, again)  # no random mask
    with torch.no_grad():
        unmasked = bert.hidden(torch.from_numpy(tokens[:8].astype(np.int64)), mask=None).mean(1)
    np.testing.assert_allclose(first, unmasked.numpy(), atol=1e-5)


def test_parse_layers():
    assert parse_layers("all", 4) == [0, 1, 2, 3, 4]
    assert parse_layers(None, 2) == [0, 1, 2]
    assert parse_layers("4,0, 2", 4) == [0, 2, 4]
    for bad in ("5", "-1", "a,b", ""):
        with pytest.raises(IgptError, match="--layers"):
            parse_layers(bad, 4)


def test_linear_probe_report_and_baselines():
    model, tokens, pixels, labels = _digits_features()
    parts = {"train": slice(0, 1000), "val": slice(1000, 1400), "test": slice(1400, None)}
    splits = {name: LabelledSplit(tokens[s], labels[s], pixels[s]) for name, s in parts.items()}
    report = linear_probe(model, splits, n_classes=10, log=lambda *_: None)
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2]
    best = max(report["layers"], key=lambda row: row["val_acc"])
    assert report["best_layer"] == best["layer"] and report["best_test_acc"] == best["test_acc"]
    for row in report["layers"]:
        assert 0.1 < row["test_acc"] <= 1.0
    baselines = report["baselines"]
    assert baselines["raw_pixels"] > 0.85  # digits are nearly linearly separable in pixels
    assert 0.1 < baselines["random_init"] <= 1.0 and baselines["chance"] == pytest.approx(0.1)
    assert len(baselines["random_init_layers"]) == 3
    with pytest.raises(IgptError, match="missing val"):
        linear_probe(model, {"train": splits["train"], "test": splits["test"]}, n_classes=10, log=lambda *_: None)


# ---- the commands on a tiny trained run ------------------------------------------------------------
@pytest.fixture(scope="module")
def colour_data(tmp_path_factory):
    """An easy labelled set: class 0 reddish, class 1 bluish, 1 in 8 pixels noise."""
    rng = np.random.default_rng(0)

    def make(n):
        y = rng.integers(0, 2, n)
        base = np.where(y[:, None, None, None] == 0, [200, 40, 40], [40, 40, 200]).astype(np.int64)
        x = base + rng.integers(-30, 31, (n, 8, 8, 3))
        noise = rng.random((n, 8, 8)) < 0.125
        x[noise] = rng.integers(0, 256, (int(noise.sum()), 3))
        return x.clip(0, 255).astype(np.uint8), y

    x_train, y_train = make(600)
    x_test, y_test = make(100)
    path = tmp_path_factory.mktemp("colours") / "colours.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, colour_data):
    from conftest import train

    return train(tmp_path_factory.mktemp("probe") / "run", data=str(colour_data), clusters=16, steps=20,
                 eval_every=20, save_every=20, sample_every=20, eval_batches=1)


def test_probe_command(run_dir, tmp_path, capsys):
    from igpt.cli import main

    out = tmp_path / "probe.json"
    assert main(["probe", "--ckpt", str(run_dir), "--out", str(out), "--max-train", "300"]) == 0
    report = json.loads(out.read_text())
    assert {"layers", "best_layer", "baselines"} <= set(report)
    assert [row["layer"] for row in report["layers"]] == [0, 1, 2]
    assert report["n_train"] == 300
    assert report["best_test_acc"] > 0.9  # the colour decides the class
    assert {"raw_pixels", "random_init"} <= set(report["baselines"])
    assert (tmp_path / "probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "best layer" in capsys.readouterr().out


def test_probe_command_protocols(run_dir, tmp_path, capsys):
    from igpt.cli import main

    out = tmp_path / "few.json"
    assert main(["probe", "--ckpt", str(run_dir), "--out", str(out), "--max-train", "200", "--labels-per-class", "4,2",
                 "--draws", "2", "--concat-layers", "1,2", "--no-baselines"]) == 0
    report = json.loads(out.read_text())
    assert report["concat"]["layer"] == [1, 2] and report["concat"]["test_acc"] > 0.9
    assert [p["labels_per_class"] for p in report["few_label"]["protocols"]] == [2, 4]
    assert all(len(row["test_accs"]) == 2 for p in report["few_label"]["protocols"] for row in p["layers"])
    text = capsys.readouterr().out
    assert "2 labels per class" in text and "layers 1+2 concatenated" in text


def test_probe_command_pools_over_a_grid(run_dir, tmp_path, capsys):
    from igpt.cli import main

    out = tmp_path / "grid.json"
    assert main(["probe", "--ckpt", str(run_dir), "--out", str(out), "--max-train", "200", "--layers", "1",
                 "--pool-grid", "2"]) == 0
    report = json.loads(out.read_text())
    assert report["pool_grid"] == 2 and report["best_layer"] == 1 and "random_init" in report["baselines"]
    assert "pooled over a 2x2 grid" in capsys.readouterr().out
    assert main(["probe", "--ckpt", str(run_dir), "--out", str(tmp_path / "bad.json"), "--pool-grid", "99"]) != 0
    assert "--pool-grid must lie in 1.." in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "9"], "--layers must lie in 0..2"),
        (["--out", "probe.txt"], "must name a .json"),
        (["--data", "missing-folder/"], "missing-folder"),
        (["--labels-per-class", "1"], "at least 2 images per class"),
        (["--labels-per-class", "5000"], "lower it or raise --max-train"),
        (["--concat-layers", "2"], "at least two layers"),
        (["--concat-layers", "1,7"], "--concat-layers must lie in 0..2"),
    ],
)
def test_probe_command_refusals(run_dir, tmp_path, capsys, monkeypatch, args, message):
    from igpt.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["probe", "--ckpt", str(run_dir), *args]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "probe.json").exists()


@pytest.mark.parametrize("args, message", [(["--labels-per-class", "4,x"], "comma-separated positive integers"),
                                           (["--draws", "0"], "must be a positive integer")])
def test_probe_command_refuses_bad_flags(run_dir, capsys, args, message):
    from igpt.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["probe", "--ckpt", str(run_dir), *args])
    err = capsys.readouterr().err
    assert exit.value.code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_probe_needs_labels(run_dir, tmp_path, capsys):
    from PIL import Image

    from igpt.cli import main

    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(30):
        Image.fromarray(np.full((8, 8, 3), i * 8, np.uint8)).save(flat / f"{i}.png")
    assert main(["probe", "--ckpt", str(run_dir), "--data", str(flat), "--out", str(tmp_path / "p.json")]) == 1
    assert "labels" in capsys.readouterr().err


def test_finetune_and_classify(run_dir, colour_data, tmp_path, capsys):
    from PIL import Image

    from igpt.cli import main
    from igpt.finetune import load_classifier

    out = tmp_path / "ft"
    assert main(["finetune", "--ckpt", str(run_dir), "--out", str(out), "--epochs", "3", "--lr", "3e-3",
                 "--batch-size", "32"]) == 0
    result = json.loads((out / "finetune.json").read_text())
    assert result["test_acc"] > 0.9 and result["best_val_acc"] > 0.9
    model, palette, classes = load_classifier(out)
    assert model.config.n_classes == 2 and classes == ["0", "1"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_acc" in r for r in records) and all(np.isfinite(r.get("loss", 0)) for r in records)

    red, blue = tmp_path / "red.png", tmp_path / "blue.jpg"
    Image.fromarray(np.full((20, 20, 3), [210, 40, 40], np.uint8)).save(red)
    Image.fromarray(np.full((16, 16, 3), [40, 40, 210], np.uint8)).save(blue)
    capsys.readouterr()
    assert main(["classify", "--ckpt", str(out), str(red), str(blue)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["0", "1"]
    assert all(0.5 < float(line.split("\t")[2]) <= 1 for line in lines)

    assert main(["finetune", "--ckpt", str(run_dir), "--out", str(out)]) == 1  # never overwrite
    assert "not empty" in capsys.readouterr().err
    assert main(["classify", "--ckpt", str(run_dir), str(red)]) == 1  # a pretraining run has no head
    assert "no classifier head" in capsys.readouterr().err
    assert main(["classify", "--ckpt", str(out), str(tmp_path / "nope.png")]) == 1
    assert "nope.png" in capsys.readouterr().err


def test_finetune_from_scratch_starts_from_random_weights(run_dir):
    from igpt.checkpoint import load_run
    from igpt.finetune import classifier_model

    pretrained, _, _ = load_run(run_dir)
    tuned = classifier_model(pretrained, 3, from_scratch=False, seed=0)
    fresh = classifier_model(pretrained, 3, from_scratch=True, seed=0)
    assert torch.equal(tuned.wte.weight, pretrained.wte.weight)
    assert not torch.equal(fresh.wte.weight, pretrained.wte.weight)
    assert torch.count_nonzero(tuned.classifier.weight) == 0 and tuned.classifier.weight.shape == (3, 32)


def test_finetune_refuses_bad_options(run_dir, tmp_path, capsys):
    from igpt.cli import main

    for args, message in ((["--gen-weight", "-1"], "--gen-weight"), (["--lr", "0"], "--lr"),
                          (["--epochs", "0"], "--epochs"), (["--batch-size", "5000"], "exceeds")):
        out = tmp_path / "x"
        assert main(["finetune", "--ckpt", str(run_dir), "--out", str(out), *args]) == 1
        assert message in capsys.readouterr().err
        assert not out.exists()


# ---- the low-data protocol and concatenated layers -------------------------------------------------
def test_few_label_draws_hold_k_of_every_class_and_are_seeded():
    labels = np.repeat(np.arange(3), [10, 7, 12])
    draws = few_label_draws(labels, 4, 3, draws=5, seed=1)
    assert len(draws) == 5
    for rows in draws:
        assert len(set(rows)) == 12 and np.bincount(labels[rows]).tolist() == [4, 4, 4]
    assert len({tuple(rows) for rows in draws}) > 1  # the draws differ
    again = few_label_draws(labels, 4, 3, draws=5, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))
    with pytest.raises(IgptError, match="class 1 has 7"):
        few_label_draws(labels, 8, 3, draws=2, seed=0)


def test_few_label_probe_uses_only_the_drawn_labels():
    _, _, pixels, labels = _digits_features()
    x = pixels[..., 0].reshape(len(pixels), -1).astype(np.float32) / 255
    train, y_train, test, y_test = x[:1200], labels[:1200], x[1200:], labels[1200:]
    draws = few_label_draws(y_train, 4, 10, draws=2, seed=0)
    result = probe_few_labels(train, y_train, test, y_test, 10, draws)
    assert len(result["test_accs"]) == 2 and 0.5 < result["test_acc"] < 1.0  # 40 labels read digits well
    assert result["test_std"] == pytest.approx(np.std(result["test_accs"]))
    scrambled = y_train.copy()
    outside = np.setdiff1d(np.arange(1200), np.concatenate(draws))
    scrambled[outside] = np.random.default_rng(0).permutation(scrambled[outside])
    assert probe_few_labels(train, scrambled, test, y_test, 10, draws) == result


def test_linear_probe_protocols():
    model, tokens, pixels, labels = _digits_features(n_layer=1)
    parts = {"train": slice(0, 1000), "val": slice(1000, 1400), "test": slice(1400, None)}
    splits = {name: LabelledSplit(tokens[s], labels[s], pixels[s]) for name, s in parts.items()}
    lines = []
    report = linear_probe(model, splits, n_classes=10, protocols=Protocols((4,), draws=1, concat_layers="0,1"),
                          log=lines.append)
    assert report["concat"]["layer"] == [0, 1]
    features = extract_features(model, tokens, [0, 1])
    joined = np.concatenate([features[0], features[1]], 1)
    by_hand = probe_features(*(a for s in parts.values() for a in (joined[s], labels[s])), n_classes=10)
    assert report["concat"]["test_acc"] == pytest.approx(by_hand.test_acc)
    few = report["few_label"]
    assert few["draws"] == 1 and [p["labels_per_class"] for p in few["protocols"]] == [4]
    (four,) = few["protocols"]
    assert [row["layer"] for row in four["layers"]] == [0, 1]
    best = max(four["layers"], key=lambda row: row["cv_acc"])
    assert four["best_layer"] == best["layer"] and four["test_acc"] == best["test_acc"]
    assert {"raw_pixels", "random_init", "concat"} <= set(four)
    assert four["raw_pixels"]["test_acc"] < report["baselines"]["raw_pixels"]  # 40 labels, not 1000
    assert "4 labels per class" in summary(report) and "concatenated" in summary(report)
    assert four["over_raw_pixels"]["mean"] == pytest.approx(four["test_acc"] - four["raw_pixels"]["test_acc"])
    assert four["over_raw_pixels"]["won"] == int(four["test_acc"] > four["raw_pixels"]["test_acc"])
    assert f"{four['over_raw_pixels']['won']} of 1 draws won" in summary(report)
    with pytest.raises(IgptError, match="at least two layers"):
        linear_probe(model, splits, n_classes=10, protocols=Protocols(concat_layers="1"), log=lines.append)
    with pytest.raises(IgptError, match="at least 2 images per class"):
        linear_probe(model, splits, n_classes=10, protocols=Protocols((1,)), log=lines.append)


def test_paired_gain_over_a_baseline_on_the_same_draws():
    gain = paired_gain([0.22, 0.25, 0.21, 0.25], [0.20, 0.24, 0.22, 0.21])
    assert gain["mean"] == pytest.approx(0.015) and gain["won"] == 3 and gain["draws"] == 4
    assert gain["stderr"] == pytest.approx(np.std([0.02, 0.01, -0.01, 0.04], ddof=1) / 2)
    steady = paired_gain([0.30, 0.40, 0.50], [0.29, 0.39, 0.49])  # spreads of 8 points, a sure gain of 1
    assert steady["stderr"] == pytest.approx(0, abs=1e-12) and steady["won"] == 3
    assert gain_text(gain) == "+1.5 +- 1.0 (standard error), 3 of 4 draws won"
    single = paired_gain([0.3], [0.2])  # one draw has no spread: None, so probe.json stays valid JSON
    assert single["stderr"] is None and gain_text(single) == "+10.0, 1 of 1 draws won"
    with pytest.raises(ValueError, match="same draws"):
        paired_gain([0.3, 0.4], [0.2])


def test_batched_fits_match_separate_fits():
    _, _, pixels, labels = _digits_features()
    x = Standardizer.fit(pixels[:300, ..., 0].reshape(300, -1))(pixels[:300, ..., 0].reshape(300, -1))
    y = torch.as_tensor(labels[:300])
    l2s = torch.tensor([1e-1, 1e-2], dtype=torch.float64).view(2, 1, 1, 1)
    keep = torch.stack([torch.arange(300) % 3 != 0, torch.ones(300, dtype=torch.bool)])
    batched = LogisticRegression(l2s).fit(x, y, 10, weights=keep / keep.sum(-1, keepdim=True))
    for g, l2 in enumerate((1e-1, 1e-2)):
        for m in range(2):
            alone = LogisticRegression(l2).fit(x[keep[m]], y[keep[m]], 10)
            np.testing.assert_allclose(batched.weight[g, m], alone.weight, atol=2e-3)
            np.testing.assert_allclose(batched.bias[g, m], alone.bias, atol=2e-3)
