"""`igpt demo` end to end at a reduced budget on the built-in digits, and its default plan."""

from __future__ import annotations

import json
import math

PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_writes_a_sane_report(tmp_path, capsys):
    from igpt.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--data", "digits", "--out", str(out), "--steps", "80", "--seed", "0"]) == 0
    for name in ("samples.png", "completions.png", "learning_curve.png", "probe.png", "surprise.png"):
        assert (out / name).read_bytes()[:8] == PNG, name
    assert (out / "samples.gif").read_bytes()[:6] == b"GIF89a"
    summary = json.loads((out / "summary.json").read_text())
    ev = summary["eval"]
    assert math.isfinite(ev["bits_per_pixel"]) and 0 < ev["bits_per_pixel"] < ev["baselines"]["uniform_bits_per_pixel"]
    assert ev["bits_per_pixel"] < ev["baselines"]["unigram_bits_per_pixel"]
    assert ev["n_images"] > 100
    probe = summary["probe"]
    assert len(probe["layers"]) == summary["model"]["n_layer"] + 1
    assert probe["best_test_acc"] > 2 * probe["baselines"]["chance"]
    assert all(0 <= row["test_acc"] <= 1 for row in probe["layers"])
    few = probe["few_label"]["protocols"]
    assert [p["labels_per_class"] for p in few] == [4, 25]  # the low-data probe beside the full-label one
    assert all(len(p["raw_pixels"]["test_accs"]) == probe["few_label"]["draws"] for p in few)
    assert summary["steps"] == 80 and all(math.isfinite(v) and v >= 0 for v in summary["timings"].values())
    markdown = (out / "report.md").read_text()
    assert "| 4 per class |" in markdown and "| 25 per class |" in markdown
    assert "beat both baselines with" in markdown or "In no protocol do the pretrained features" in markdown
    assert "8x8 digits, centred. Small, centred images are close to linearly separable" in markdown  # and why it matters
    assert "FID and KID skipped" in markdown or "FID " in markdown
    for section in ("## Likelihood", "## Samples", "## Completions", "## Surprise", "## Linear probe", "## Timings"):
        assert section in markdown
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4 and html.count("data:image/gif;base64,") == 1
    assert "not produced" not in html
    assert (out / "run" / "model.safetensors").is_file() and (out / "run" / "metrics.jsonl").is_file()
    assert "igpt demo finished" in capsys.readouterr().out


def test_the_default_demo_is_shifted_digits_sized_for_five_minutes():
    from igpt.cli import build_parser
    from igpt.demo import DEFAULT_DATA, plan_for

    args = build_parser().parse_args(["demo"])
    assert args.name == DEFAULT_DATA == "shifted-digits" and args.budget_minutes is None
    plan = plan_for(args.name)
    assert (plan.data.resolution, plan.pretrain.clusters, plan.pretrain.batch_size, plan.probe_images) == (12, 16, 32, 1500)
    assert plan.budget_minutes <= 4  # a minute of setup (venv, pip) on top: the README's first command fits five
    assert plan_for("digits").pretrain.batch_size == 64 and plan_for("digits").probe_images == 10_000  # the defaults


def test_demo_refuses_a_used_folder_and_bad_budget(tmp_path, capsys):
    from igpt.cli import main

    used = tmp_path / "used"
    used.mkdir()
    (used / "keep.txt").write_text("mine")
    assert main(["demo", "--out", str(used)]) == 1
    assert "not empty" in capsys.readouterr().err and (used / "keep.txt").read_text() == "mine"
    assert main(["demo", "--out", str(tmp_path / "b"), "--budget-minutes", "0"]) == 1
    assert "--budget-minutes" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_default_output_folder_never_reuses_one(tmp_path, monkeypatch):
    from igpt.demo import default_out

    monkeypatch.chdir(tmp_path)
    first = default_out("digits")
    assert first.name == "igpt-demo-digits"
    first.mkdir()
    assert default_out("digits").name == "igpt-demo-digits-2"
    assert default_out("../shared/datasets/cifar10/x.tar.gz").name == "igpt-demo-x-tar-gz"
