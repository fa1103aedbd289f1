"""Transfer: a run pretrained on one data set, evaluated, probed and fine-tuned on another, whose images are
fitted to the model's resolution and encoded with its palette; the run's own data folder and crop stay behind."""

import json

import numpy as np

from conftest import train
from igpt import DataConfig
from igpt.cli import main
from igpt.model import ImageGPTConfig
from igpt.runrecord import RunInfo


def labelled_npz(path, side=12, per_class=12, classes=3):
    """Three classes of 12x12 pictures, brighter with the class, as an .npz of another data set."""
    rng = np.random.default_rng(0)

    def split(n):
        labels = np.arange(n) % classes
        images = rng.integers(0, 60, (n, side, side, 3)) + 60 * labels[:, None, None, None]
        return images.astype(np.uint8), labels

    x_train, y_train = split(per_class * classes)
    x_test, y_test = split(per_class)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return path


def test_another_data_set_takes_its_own_description():
    info = RunInfo(kind="pretrain", data=DataConfig(name="cifar10", data_dir="/data/cifar", crop=True, resolution=32))
    model = ImageGPTConfig(n_ctx=64)
    assert info.data_for(model, name="stl10") == DataConfig(name="stl10", resolution=8)
    assert info.data_for(model, name="stl10", data_dir="/data/stl") == DataConfig(name="stl10", data_dir="/data/stl",
                                                                                   resolution=8)
    assert info.data_for(model, name="cifar10") == DataConfig(name="cifar10", data_dir="/data/cifar", crop=True,
                                                              resolution=8)


def test_a_digits_run_is_evaluated_probed_and_fine_tuned_on_other_images(tmp_path, capsys):
    run = train(tmp_path / "run", steps=4, save_every=4)  # pretrained on scikit-learn's digits at 8x8
    other = str(labelled_npz(tmp_path / "other.npz"))
    assert main(["eval", "--ckpt", str(run), "--data", other, "--json", str(tmp_path / "eval.json")]) == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["n_images"] == 12 and np.isfinite(evaluated["bits_per_pixel"])
    probe = tmp_path / "probe.json"
    assert main(["probe", "--ckpt", str(run), "--data", other, "--no-baselines", "--out", str(probe)]) == 0
    report = json.loads(probe.read_text())
    assert report["data"] == other and report["classes"] == ["0", "1", "2"] and report["n_test"] == 12
    tuned = tmp_path / "tuned"
    assert main(["finetune", "--ckpt", str(run), "--data", other, "--steps", "2", "--batch-size", "8",
                 "--out", str(tuned)]) == 0
    record = json.loads((tuned / "run.json").read_text())
    assert record["data"]["name"] == other and record["data"]["resolution"] == 8 and record["classes"] == ["0", "1", "2"]
    assert json.loads((tuned / "finetune.json").read_text())["n_test"] == 12
