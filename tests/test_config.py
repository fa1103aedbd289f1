"""One configuration: flags made from the dataclasses, one data description, one run.json reader."""

import argparse
import dataclasses
import inspect
import json

import numpy as np
import pytest

from igpt.cli import build_parser
from igpt.data import DataConfig
from igpt.finetune import FinetuneConfig
from igpt.pretrain import PretrainConfig
from igpt.runrecord import RunInfo
from igpt.train import TrainConfig


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[name] = sub
                found.update({f"{name} {k}": v for k, v in subparsers(sub).items()})
    return found


def flag_defaults(parser: argparse.ArgumentParser) -> dict[str, object]:
    return {a.dest: a.default for a in parser._actions if a.option_strings and a.dest != "help"}


PLANNED = {"train": {"resolution"}}  # flags igpt.plan fills in from the data when they are not given


@pytest.mark.parametrize("command, configs", [
    ("train", (DataConfig, PretrainConfig)),
    ("finetune", (FinetuneConfig,)),
    ("palette fit", (DataConfig,)),
])
def test_every_flag_default_is_its_field_default(command, configs):
    defaults = flag_defaults(subparsers(build_parser())[command])
    fields = {f.name: f.default for cls in configs for f in dataclasses.fields(cls)}
    shared = set(defaults) & set(fields)
    assert shared, command
    for name in shared - PLANNED.get(command, set()):
        assert defaults[name] == fields[name], f"{command} --{name}"
    for name in PLANNED.get(command, set()):
        assert defaults[name] is None, f"{command} --{name} must default to what the data decides"


def test_fine_tuning_keeps_the_loops_fields_and_changes_only_its_defaults():
    loop = {f.name for f in dataclasses.fields(TrainConfig)}
    assert loop <= {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert FinetuneConfig().schedule == "constant" and TrainConfig().schedule == "cosine"
    assert FinetuneConfig.__dataclass_fields__["epochs"].metadata["help"] == \
        TrainConfig.__dataclass_fields__["epochs"].metadata["help"]


@pytest.mark.parametrize("command", ["eval", "probe", "complete", "finetune"])
def test_commands_that_read_a_run_take_its_data_unless_told(command):
    defaults = flag_defaults(subparsers(build_parser())[command])
    for field in dataclasses.fields(DataConfig):
        if field.name != "resolution":
            assert defaults[field.name] is None, f"{command} --{field.name} must default to the run's"
    assert "resolution" not in defaults  # the model decides


def test_sampling_flag_defaults_are_the_library_defaults():
    from igpt.sample import sample

    defaults = flag_defaults(subparsers(build_parser())["sample"])
    for name, parameter in inspect.signature(sample).parameters.items():
        if name in defaults and parameter.default is not inspect.Parameter.empty:
            assert defaults[name] == parameter.default, name


def test_run_info_reads_both_kinds_and_the_first_version(tmp_path):
    data = DataConfig(name="cifar10", data_dir="/data", crop=True, resolution=16)
    (tmp_path / "run.json").write_text(json.dumps({"kind": "finetune", "data": dataclasses.asdict(data),
                                                    "config": {"lr": 1e-4}, "step": 7, "classes": ["a", "b"],
                                                    "source": "runs/x"}))
    info = RunInfo.read(tmp_path)
    assert (info.kind, info.data, info.config, info.step, info.classes, info.source) == \
        ("finetune", data, {"lr": 1e-4}, 7, ["a", "b"], "runs/x")
    old = tmp_path / "old"
    old.mkdir()
    (old / "run.json").write_text(json.dumps({"train": {"data": "digits", "data_dir": None, "resolution": 8,
                                                        "crop": True, "lr": 3e-3}, "step": 12}))
    info = RunInfo.read(old)
    assert info.kind == "pretrain" and info.data == DataConfig(name="digits", crop=True, resolution=8)
    assert info.config["lr"] == 3e-3 and info.step == 12
    assert RunInfo.read(tmp_path / "missing") == RunInfo()


def test_a_later_command_changes_only_what_it_is_told():
    from igpt.model import ImageGPTConfig

    info = RunInfo(kind="pretrain", data=DataConfig(name="cifar10", crop=True, resolution=16))
    model = ImageGPTConfig(n_ctx=64)
    assert info.data_for(model) == DataConfig(name="cifar10", crop=True, resolution=8)
    assert info.data_for(model, crop=False, name="x") == DataConfig(name="x", crop=False, resolution=8)
    with pytest.raises(Exception, match="pass --data"):
        RunInfo().data_for(model)


def test_complete_reads_the_runs_data_description(tiny_copy, tmp_path, monkeypatch, capsys):
    """The run says crop=True: `igpt complete` must read the images the same way, not fall back to defaults."""
    from igpt import data
    from igpt.cli import main

    saved = json.loads((tiny_copy / "run.json").read_text())
    saved["data"]["crop"] = True
    (tiny_copy / "run.json").write_text(json.dumps(saved))
    seen = []
    real = data.load
    monkeypatch.setattr(data, "load", lambda *a, **k: seen.append((a, k)) or real(*a, **k))
    assert main(["complete", "--ckpt", str(tiny_copy), "--n", "1", "--samples", "1",
                 "--out", str(tmp_path / "c.png")]) == 0
    assert seen and all(k["crop"] is True and a[0] == "digits" for a, k in seen)
    assert np.load(tmp_path / "c.npy").shape == (1, 3, 8, 8, 3)
