"""Pretraining: schedule, deterministic batches, run folders, exact resume, refusals, scale-out."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import KILLED_AT_STEP_10, PAPER_FLAGS, pretraining
from conftest import train as train_into
from igpt import IgptError
from igpt.precision import bf16_native
from igpt.batches import Batches
from igpt.checkpoint import RunFolder, load_run
from igpt.pretrain import PretrainConfig
from igpt.train import Trainer, learning_rate


def train(tmp_path, name="run", resume=False, **changes):
    return train_into(tmp_path / name, resume=resume, **changes)


def step_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in RunFolder(run).metrics() if "loss" in r}


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    lrs = [learning_rate(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert learning_rate(60, 1.0, 10, 110) == pytest.approx(0.5)
    assert learning_rate(110, 1.0, 10, 110) == pytest.approx(0.0, abs=1e-12)


def test_batches_depend_only_on_seed_and_step():
    tokens = np.arange(100 * 4, dtype=np.uint16).reshape(100, 4)
    a, b = Batches(8, 0, tokens=tokens), Batches(8, 0, tokens=tokens)
    for step in (30, 3, 12, 3):
        torch.testing.assert_close(a(step).tokens, b(step).tokens)
    epoch = np.concatenate([a.indices(s) for s in range(a.per_epoch)])
    assert len(np.unique(epoch)) == len(epoch) == 96  # an epoch visits distinct images
    assert not np.array_equal(a.indices(0), Batches(8, 1, tokens=tokens).indices(0))


def test_a_run_folder_is_self_contained(tiny_run):
    run = tiny_run
    for name in ("config.json", "model.safetensors", "palette.npy", "run.json", "train_state.pt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert (run / "best" / "model.safetensors").is_file()
    assert list((run / "samples").glob("*.png"))
    records = RunFolder(run).metrics()
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert all({"lr", "tokens_per_s"} <= r.keys() and math.isfinite(r["loss"]) for r in steps)
    vals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in vals] == [6, 12]
    assert vals[0]["val_bits_per_pixel"] == pytest.approx(vals[0]["val_loss"] / math.log(2))
    assert steps[-1]["loss"] < steps[0]["loss"]
    events = EventAccumulator(str(run)).Reload()
    assert {"loss", "lr", "val_loss"} <= set(events.Tags()["scalars"])
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == [(r["step"], r["loss"]) for r in steps]
    model, palette, info = load_run(run)
    assert model.config.vocab_size == palette.size == 17 and info.step == 12
    assert info.kind == "pretrain" and info.data.name == "digits" and info.data.resolution == 8


def test_resume_after_sigkill_reproduces_the_uninterrupted_run(tiny_run, tmp_path):
    full = step_losses(tiny_run)
    args = ["train", "--data", "digits", "--resolution", "8", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
            "--batch-size", "32", "--steps", "12", "--eval-every", "6", "--save-every", "4", "--sample-every", "12",
            "--eval-batches", "2", "--precision", "fp32", *PAPER_FLAGS, "--out", str(tmp_path / "cut")]
    killed = subprocess.run([sys.executable, "-c", KILLED_AT_STEP_10, *args], capture_output=True, env=os.environ)
    assert killed.returncode == -9
    assert RunFolder(tmp_path / "cut").saved_step() == 8
    trainer = Trainer(pretraining(), tmp_path / "cut", resume=True, log=lambda *_: None, progress=False)
    assert trainer.start == 8
    trainer.run()
    resumed = step_losses(tmp_path / "cut")
    assert sorted(resumed) == list(range(1, 13))
    for step in range(1, 13):
        assert resumed[step] == pytest.approx(full[step], abs=1e-6), step


def test_gradient_accumulation_gives_the_same_steps(tmp_path):
    one = step_losses(train(tmp_path, "one", steps=4, eval_every=4))
    two = step_losses(train(tmp_path, "two", steps=4, eval_every=4, grad_accum=4))
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5)


@pytest.mark.slow
def test_compiled_training_takes_the_eager_steps(tmp_path):
    """`--compile` (the CPU hour's recipe) must only make the steps faster: the Trainer's compiled step, optimizer and
    checkpoint give the same losses and saved weights as eager (test_model checks the compiled model alone)."""
    recipe = dict(steps=4, eval_every=4, positions="2d", attention="strided")
    eager = train(tmp_path, "eager", **recipe)
    compiled = train(tmp_path, "compiled", compile=True, **recipe)
    losses = step_losses(eager)
    assert step_losses(compiled) == pytest.approx(losses, abs=1e-4) and len(losses) == 4
    for a, b in zip(load_run(eager)[0].parameters(), load_run(compiled)[0].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_minutes_size_the_run_that_its_steps_give(tmp_path, monkeypatch):
    """--minutes times the loop's steps without changing the run: the run it sizes is the one --steps gives, also
    when interrupted and resumed with the same command (which keeps the sized count and times nothing)."""
    import igpt.train as train_module

    monkeypatch.setattr(train_module, "BUDGET_SHARE", 0.25)  # slack, so that a busy machine does not hit the cutoff
    stops = iter([False, False, True])
    monkeypatch.setattr(Trainer, "_stop_requested", lambda self: next(stops, False))  # a Ctrl-C after step 3
    budgeted = train(tmp_path, "budgeted", steps=None, minutes=0.1)
    steps = json.loads((budgeted / "run.json").read_text())["config"]["steps"]
    assert steps >= 4 and RunFolder(budgeted).saved_step() == 3
    said = []
    Trainer(pretraining(steps=None, minutes=0.1), budgeted, resume=True, log=said.append, progress=False).run()
    assert not any("--minutes" in line for line in said)
    fixed = train(tmp_path, "fixed", steps=steps)
    assert step_losses(budgeted) == step_losses(fixed) and max(step_losses(fixed)) == steps
    for a, b in zip(load_run(budgeted)[0].parameters(), load_run(fixed)[0].parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert sorted(p.name for p in (budgeted / "samples").iterdir()) == sorted(p.name for p in (fixed / "samples").iterdir())


def test_sizing_a_budgeted_run_changes_neither_the_callers_config_nor_the_run_folder(tmp_path):
    """The Trainer keeps its sized copy of the configuration; the checkpoint and sample grid it times go to a
    scratch folder, so its own folder holds nothing but its lock until the run begins."""
    task = pretraining(steps=None, minutes=0.2)
    trainer = Trainer(task, tmp_path / "run", log=lambda line: None, progress=False)
    try:
        assert task.cfg.steps is None and trainer.config.steps >= 1 and trainer.config.minutes == 0.2
        assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]
    finally:
        trainer.close(finished=False)


def test_minutes_end_the_run_before_the_deadline(tmp_path, monkeypatch):
    """Steps slower than timed (here: twenty times too many sized) end before the deadline, validated and saved."""
    import igpt.train as train_module

    monkeypatch.setattr(train_module, "BUDGET_SHARE", 20.0)
    start = time.perf_counter()
    run = train(tmp_path, steps=None, minutes=0.1)
    wall = time.perf_counter() - start
    done, sized = max(step_losses(run)), json.loads((run / "run.json").read_text())["config"]["steps"]
    assert done < sized and wall < 0.1 * 60 + 2
    state = RunFolder(run).train_state()
    assert state["finished"] and state["step"] == done
    assert max(r["step"] for r in RunFolder(run).metrics() if "val_loss" in r) == done


def test_minutes_spent_before_the_first_step_are_refused(tmp_path):
    with pytest.raises(IgptError, match="--minutes 0.0001 is spent before the first step"):
        train(tmp_path, steps=None, minutes=1e-4)
    assert not (tmp_path / "run").exists()
    with pytest.raises(IgptError, match="--minutes must be positive"):
        PretrainConfig(minutes=0)


def test_bert_objective_trains(tmp_path):
    losses = step_losses(train(tmp_path, objective="bert", steps=8, eval_every=8, lr=1e-2))
    assert all(math.isfinite(v) for v in losses.values())
    model, _, _ = load_run(tmp_path / "run")
    assert model.config.objective == "bert"


def test_refusals_come_before_any_training(tiny_run, tmp_path):
    with pytest.raises(IgptError, match="not empty"):
        Trainer(pretraining(), tiny_run, log=lambda *_: None)
    with pytest.raises(IgptError, match=r"lr 0\.003 \(run\) vs 0\.01 \(now\)"):
        Trainer(pretraining(lr=0.01), tiny_run, resume=True, log=lambda *_: None)
    with pytest.raises(IgptError, match=r"resolution 8 \(run\) vs 6 \(now\)"):
        Trainer(pretraining(resolution=6), tiny_run, resume=True, log=lambda *_: None)
    (tmp_path / "file").write_text("x")
    with pytest.raises(IgptError, match="is a file"):
        Trainer(pretraining(), tmp_path / "file", log=lambda *_: None)
    with pytest.raises(IgptError, match="nothing to resume"):
        Trainer(pretraining(), tmp_path / "empty", resume=True, log=lambda *_: None)
    with pytest.raises(IgptError, match="--batch-size must be positive"):
        PretrainConfig(batch_size=0)


def test_a_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import igpt.train as train_module

    real = train_module.nll
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        total, count = real(*args)
        return (total * float("nan"), count) if calls["n"] > 5 else (total, count)

    monkeypatch.setattr(train_module, "nll", poisoned)
    with pytest.raises(IgptError, match="non-finite at step 6.*step 4"):
        train(tmp_path, eval_every=100)
    assert RunFolder(tmp_path / "run").saved_step() == 4


def test_eval_command_writes_exact_json(tiny_run, tmp_path):
    from igpt.cli import main

    run = tiny_run
    out = tmp_path / "eval.json"
    assert main(["eval", "--ckpt", str(run), "--split", "test", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n_images"] > 100 and math.isfinite(result["nats_per_token"])
    assert result["bits_per_pixel"] == pytest.approx(result["nats_per_token"] / math.log(2))
    assert result["baselines"]["uniform_bits_per_pixel"] == pytest.approx(math.log2(17))


SMALL_RUN = ["--data", "digits", "--resolution", "8", "--n-layer", "2", "--n-embd", "32", "--n-head", "2",
             "--batch-size", "32", "--eval-batches", "2", "--device", "cpu", "--precision", "fp32", *PAPER_FLAGS]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def two_processes(flags: list[str], port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(port), "-m", "igpt.cli", "train", *flags], capture_output=True, text=True, env=ONE_THREAD,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_gloo_processes_match_one(tmp_path, sharding):
    common = [*SMALL_RUN, "--steps", "4", "--eval-every", "4", "--sample-every", "4"]
    single = subprocess.run([sys.executable, "-m", "igpt.cli", "train", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=ONE_THREAD)
    assert single.returncode == 0, single.stderr
    dual = two_processes([*common, *sharding, "--out", str(tmp_path / "two")], 29581)
    assert dual.returncode == 0, dual.stderr[-3000:]
    one, two = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], abs=1e-5)
    resumed = Trainer(pretraining(steps=4, eval_every=4, sample_every=4), tmp_path / "two", resume=True,
                      log=lambda *_: None, progress=False)
    assert resumed.start == 4  # a two-process checkpoint opens in one process


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_gloo_processes_share_one_budget(tmp_path, sharding):
    """--minutes under torchrun: rank 0's sizing holds on both ranks, which take the same steps to the end
    (a rank stepping on alone would hang its collectives): the sized count, or fewer where the deadline's
    cutoff ended the run on both, as a loaded machine can make it."""
    run = tmp_path / "two"
    dual = two_processes([*SMALL_RUN, "--minutes", "0.25", "--eval-every", "20", *sharding, "--out", str(run)], 29582)
    assert dual.returncode == 0, dual.stderr[-3000:]
    sized = json.loads((run / "run.json").read_text())["config"]["steps"]
    steps = sorted(step_losses(run))
    last = steps[-1]
    assert steps == list(range(1, last + 1)) and RunFolder(run).train_state()["finished"]
    assert last == sized or f"the run ends at step {last} of {sized}" in dual.stdout + dual.stderr


def test_a_folder_mixing_palette_and_model_is_refused(tiny_copy, tmp_path, capsys):
    from igpt.cli import main
    from igpt.palette import Palette

    run = tiny_copy
    Palette(np.zeros((5, 3), dtype=np.float32)).save(run / "palette.npy")
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--n", "1", "--out", str(tmp_path / "s.png")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "palette has 5 colours but the model's vocabulary is 17" in err[0]
    (run / "palette.npy").unlink()
    assert main(["eval", "--ckpt", str(run)]) == 1
    assert "has no palette" in capsys.readouterr().err


def test_palette_fit_command(tmp_path, capsys):
    from igpt.cli import main
    from igpt.palette import Palette

    assert main(["palette", "fit", "--data", "digits", "--resolution", "8", "--out", str(tmp_path / "p.npy")]) == 0
    assert "17 distinct colours" in capsys.readouterr().out
    assert Palette.load(tmp_path / "p.npy").size == 17
    assert main(["palette", "fit", "--data", "digits", "--resolution", "8", "--out", str(tmp_path / "p.txt")]) == 1
    assert main(["palette", "fit", "--data", "imagenet", "--out", str(tmp_path / "q.npy")]) == 1
    assert not (tmp_path / "q.npy").exists()


def test_precision_is_chosen_for_the_hardware_and_said(tmp_path, capsys, monkeypatch):
    """auto is bf16 where bf16 is native and fp32 elsewhere; every command says what it chose, in one line, and
    bf16 asked for without hardware support (hundreds of times slower than fp32) is called out, not refused."""
    import igpt.precision
    from igpt.cli import main
    from igpt.precision import precision_choice, resolve_precision

    cpu = torch.device("cpu")
    for native, chosen in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(igpt.precision, "bf16_native", lambda device, native=native: native)
        assert resolve_precision("auto", cpu) == chosen and resolve_precision("fp32", cpu) == "fp32"
        assert precision_choice("auto", cpu).startswith(f"precision: {chosen} (auto: this CPU")
    assert "warning" not in precision_choice("fp32", cpu)
    warning = precision_choice("bf16", cpu)
    assert "no native bf16" in warning and "--precision fp32" in warning
    assert main(["eval", "--ckpt", str(tmp_path / "missing"), "--precision", "bf16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "no native bf16" in err[0] and "missing" in err[1]
    assert main(["eval", "--ckpt", str(tmp_path / "missing")]) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1  # an error is one line, with no precision before it
    monkeypatch.setattr(igpt.precision, "bf16_native", lambda device: True)
    assert "warning" not in precision_choice("bf16", cpu)
    out = tmp_path / "run"
    assert main(["train", "--data", "digits", "--out", str(out), "--steps", "2", "--batch-size", "8",
                 "--n-layer", "1", "--n-embd", "16", "--n-head", "2"]) == 0
    assert "; bf16;" in capsys.readouterr().out  # the plan line
    assert json.loads((out / "run.json").read_text())["config"]["precision"] == "bf16"
    assert main(["eval", "--ckpt", str(out), "--batch-size", "64"]) == 0
    assert capsys.readouterr().err.strip().splitlines()[-1] == "igpt: precision: bf16 (auto: this CPU runs bf16 natively)"


@pytest.mark.skipif(not bf16_native(torch.device("cpu")),
                    reason="bf16 is emulated on this CPU, far slower than fp32")
def test_a_bf16_run_follows_the_fp32_runs_loss_curve(tmp_path):
    """The same run in bf16 autocast and in fp32. bf16 rounds each matrix product's inputs to 8 significant bits
    (2**-9 relative), which moves the first loss by about 1e-3 nats; the runs then drift apart as any two runs
    with different rounding do, by far less than training moves the loss. Held: every step within 0.05 nats
    (the loss falls by almost 1 nat in these 40 steps; the two runs stayed within 0.004 when this was written)
    and the last 10 steps' mean within 1%."""
    from conftest import pretraining
    from igpt.checkpoint import RunFolder
    from igpt.train import Trainer

    curves = {}
    for precision in ("fp32", "bf16"):
        task = pretraining(precision=precision, steps=40, eval_every=40, save_every=40, sample_every=40)
        Trainer(task, tmp_path / precision, log=lambda *_: None, progress=False).run()
        curves[precision] = np.array([r["loss"] for r in RunFolder(tmp_path / precision).metrics() if "loss" in r])
    fp32, bf16 = curves["fp32"], curves["bf16"]
    assert len(fp32) == len(bf16) == 40 and fp32[0] - fp32[-10:].mean() > 0.5
    assert np.abs(bf16 - fp32).max() < 0.05
    assert abs(bf16[-10:].mean() - fp32[-10:].mean()) < 0.01 * fp32[-10:].mean()
