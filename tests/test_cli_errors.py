"""The robustness audit: every command, fed what users get wrong, ends in one clear line.

Each case runs the real CLI in an empty working folder and checks: a non-zero exit, exactly
one line on stderr naming the problem, no traceback, and no output left behind.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import run_refused

from igpt.cli import main


def _damaged(run_dir: Path, root: Path) -> dict[str, Path]:
    """Copies of a good run, each broken in one way users meet."""
    cases = {}

    def copy(name):
        target = root / name
        shutil.copytree(run_dir, target)
        cases[name] = target
        return target

    weights = copy("truncated") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (copy("no-config") / "config.json").unlink()
    config = copy("other-shape") / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "n_layer": 3}))
    config = copy("future-version") / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rope_theta": 10000.0}))
    np.save(copy("palette-size") / "palette.npy", np.zeros((7, 3), np.float32))
    config = copy("not-json") / "config.json"
    config.write_text("{not json")
    config = copy("non-square") / "config.json"
    values = json.loads(config.read_text())
    config.write_text(json.dumps({**values, "n_ctx": 60}))
    from safetensors.torch import load_file, save_file

    state = load_file(root / "non-square" / "model.safetensors")
    state["wpe"] = state["wpe"][:60].contiguous()
    save_file(state, root / "non-square" / "model.safetensors")
    return cases


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_run):
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    good = root / "good.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(good)
    (root / "empty.png").write_bytes(b"")
    (root / "text.png").write_text("this is not an image")
    (root / "truncated.png").write_bytes(good.read_bytes()[:20])
    (root / "a-file").write_text("x")
    (root / "flat").mkdir()
    for i in range(12):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / "flat" / f"{i}.png")
    paths = {name.replace(".", "-"): root / name
             for name in ("good.png", "empty.png", "text.png", "truncated.png", "a-file", "flat")}
    paths.update(_damaged(tiny_run, root))
    paths["run"] = tiny_run
    return paths


# (command line with {placeholders}, words the one line must contain)
CASES = [
    # demo
    ("demo --data no-such-set", "unknown data set"),
    ("demo --budget-minutes -1", "--budget-minutes"),
    ("demo --steps 0", "--steps"),
    ("demo --out {a-file}", "not empty"),
    # palette fit
    ("palette fit --data missing/ --out p.npy", "missing"),
    ("palette fit --data {a-file} --out p.npy", "a-file"),
    ("palette fit --clusters 0 --out p.npy", "--clusters"),
    ("palette fit --resolution -8 --out p.npy", "--resolution"),
    ("palette fit --resolution 8 --out p.txt", ".npy or .json"),
    ("palette fit --data {flat} --resolution 8 --clusters 4 --out {a-file}/p.npy", "is a file, not a folder"),
    # train
    ("train --batch-size -1 --out r", "--batch-size"),
    ("train --steps 0 --out r", "--steps"),
    ("train --steps abc --out r", "--steps"),
    ("train --model huge --out r", "preset"),
    ("train --lr 0 --out r", "--lr"),
    ("train --lr nan --out r", "--lr"),
    ("train --data nope --out r", "unknown data set"),
    ("train --out {a-file}", "is a file"),
    ("train --out {run}", "not empty"),
    ("train --out r --resume", "nothing to resume"),
    ("train --out {run} --resume --lr 1", "different configuration"),
    ("train --batch-size 4096 --steps 1 --out r", "exceeds"),
    ("train --grad-accum 3 --batch-size 16 --out r", "divisible"),
    ("train --objective gan --out r", "--objective"),
    # eval
    ("eval --ckpt missing", "not a folder"),
    ("eval --ckpt {a-file}", "not a folder"),
    ("eval --ckpt {flat}", "not an igpt model"),
    ("eval --ckpt {truncated}", "damaged or truncated"),
    ("eval --ckpt {no-config}", "config.json"),
    ("eval --ckpt {other-shape}", "does not match"),
    ("eval --ckpt {future-version}", "rope_theta"),
    ("eval --ckpt {palette-size}", "7 colours"),
    ("eval --ckpt {not-json}", "not readable JSON"),
    ("eval --ckpt {run} --split dev", "--split"),
    ("eval --ckpt {run} --batch-size 0", "--batch-size"),
    # sample
    ("sample --ckpt {run} --temperature 0 --out s.png", "temperature"),
    ("sample --ckpt {run} --top-p 1.5 --out s.png", "top-p"),
    ("sample --ckpt {run} --top-p 0 --out s.png", "top-p"),
    ("sample --ckpt {run} --top-k 0 --out s.png", "top-k"),
    ("sample --ckpt {run} --n 0 --out s.png", "--n"),
    ("sample --ckpt {non-square} --out s.png", "not a square"),
    ("sample --ckpt {palette-size} --out s.png", "7 colours"),
    # complete
    ("complete --ckpt {run} --keep-rows 9 --out c.png", "--keep-rows"),
    ("complete --ckpt {run} --keep-rows -1 --out c.png", "--keep-rows"),
    ("complete --ckpt {run} --keep 1.5 --out c.png", "--keep"),
    ("complete --ckpt {run} {good-png} {text-png} --out c.png", "text.png"),
    ("complete --ckpt {run} {empty-png} --skip-bad --out c.png", "none of the"),
    ("complete --ckpt {run} no-such.png --out c.png", "no-such.png"),
    ("complete --ckpt {run} --animate c.mp4 --out c.png", ".gif or .webp"),
    ("sample --ckpt {run} --animate s.png --out s.png", ".gif or .webp"),
    # surprise
    ("surprise --ckpt {run} {truncated-png} --out m.png", "truncated.png"),
    ("surprise --ckpt missing --out m.png", "not a folder"),
    ("surprise --ckpt {run} --n 0 --out m.png", "--n"),
    ("surprise --ckpt {run} --rounds 0 --out m.png", "--rounds"),
    # convert
    ("convert --from-hf {flat} --out h", "flat"),
    ("convert --to-hf missing --out h", "not a folder"),
    ("convert --to-hf {run} --out {run}", "not an empty folder"),
    # probe
    ("probe --ckpt {run} --layers 5", "--layers"),
    ("probe --ckpt {run} --layers x", "--layers"),
    ("probe --ckpt {run} --out p.csv", ".json"),
    ("probe --ckpt {run} --data {flat}", "labels"),
    ("probe --ckpt {truncated}", "damaged or truncated"),
    # finetune
    ("finetune --ckpt {run} --out f --gen-weight -1", "--gen-weight"),
    ("finetune --ckpt {run} --out f --epochs 0", "--epochs"),
    ("finetune --ckpt {run} --out {run}", "not empty"),
    ("finetune --ckpt missing --out f", "not a folder"),
    # classify
    ("classify --ckpt {run} {good-png}", "no classifier head"),
    ("classify --ckpt missing {good-png}", "not a folder"),
]


@pytest.mark.parametrize("line, words", CASES, ids=[c[0].split(" --")[0] + ": " + c[1] for c in CASES])
def test_user_errors_end_in_one_clear_line(line, words, files, tmp_path, monkeypatch, capsys):
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for f in files.values() for p in [f, *f.rglob("*")]}
    err = run_refused(line.format(**files).split(), tmp_path, monkeypatch, capsys)
    assert words in err, err
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for f in files.values() for p in [f, *f.rglob("*")]}
    assert before == after, f"{line} changed its inputs"


@pytest.mark.parametrize("name, words", [("empty-png", "empty.png"), ("text-png", "text.png"),
                                         ("truncated-png", "truncated.png")])
def test_classify_names_the_bad_image(name, words, files, tmp_path, capsys):
    from igpt.finetune import FinetuneConfig, Finetuning
    from igpt.train import Trainer

    tuned = tmp_path / "tuned"
    if not tuned.exists():
        Trainer(Finetuning(files["run"], FinetuneConfig(epochs=0.05, batch_size=16)), tuned, log=lambda *_: None,
                progress=False).run()
    capsys.readouterr()
    assert main(["classify", "--ckpt", str(tuned), str(files["good-png"]), str(files[name])]) == 1
    err = capsys.readouterr().err.strip()
    assert words in err and len(err.splitlines()) == 1 and "Traceback" not in err
