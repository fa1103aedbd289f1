"""`igpt demo`: the whole story in one command, sized to a time budget.

Fit a palette, pretrain, measure bits per pixel on the test split, sample, complete the
bottom halves of test images, probe every layer against the raw-pixel and random-init
baselines, and write `report.md` and a self-contained `report.html`. The number of training
steps comes from timing a few real steps first, so the run fits the budget on any machine.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from igpt import data, plots
from igpt.distributed import resolve_device
from igpt.errors import IgptError
from igpt.fileio import atomic_write_json
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.palette import Palette
from igpt.report import Report

TRAIN_SHARE = 0.6  # of the budget; the rest is palette, evaluation, sampling, probes and the report


@dataclass
class Plan:
    """What the demo runs on a data set: chosen for a few CPU minutes, scaled by the budget."""

    data: str
    resolution: int
    clusters: int
    model: str = "tiny"
    overrides: dict = field(default_factory=dict)
    batch_size: int = 64
    lr: float = 3e-3
    budget_minutes: float = 5.0
    probe_images: int = 10_000  # per split, at most
    crop: bool = False

    def describe(self) -> str:
        shape = ImageGPTConfig.from_preset(self.model, **self.overrides)
        return (f"{self.data} at {self.resolution}x{self.resolution}, {self.clusters}-colour palette, "
                f"{self.model} model ({shape.n_layer} layers, width {shape.n_embd}), batch {self.batch_size}, "
                f"{self.budget_minutes:g}-minute budget")


PLANS = {
    "digits": dict(resolution=8, clusters=16, budget_minutes=5.0),
    "mnist": dict(resolution=16, clusters=16, budget_minutes=20.0),
    "fashion-mnist": dict(resolution=16, clusters=32, budget_minutes=20.0),
    "cifar10": dict(resolution=16, clusters=256, budget_minutes=20.0),
    "cifar100": dict(resolution=16, clusters=256, budget_minutes=20.0),
}
OTHER = dict(resolution=16, clusters=256, budget_minutes=20.0, crop=True)  # folders and archives of any images


def plan_for(spec: str, budget_minutes: float | None = None) -> Plan:
    plan = Plan(data=spec, **PLANS.get(spec, OTHER))
    if budget_minutes is not None:
        if not budget_minutes > 0:
            raise IgptError(f"--budget-minutes must be positive, got {budget_minutes}")
        plan.budget_minutes = budget_minutes
    return plan


def default_out(spec: str) -> Path:
    """igpt-demo-<data>, or the first igpt-demo-<data>-N that does not exist: a rerun never overwrites."""
    stem = "igpt-demo-" + "".join(c if c.isalnum() or c in "-_" else "-" for c in Path(spec).name).strip("-")
    candidate, n = Path(stem), 2
    while candidate.exists():
        candidate, n = Path(f"{stem}-{n}"), n + 1
    return candidate


def time_step(config: ImageGPTConfig, batch_size: int, device: torch.device, precision: str, steps: int = 3) -> float:
    """Seconds per optimizer step of this model on random tokens (after one warm-up step)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ImageGPT(config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    tokens = torch.randint(0, config.vocab_size, (batch_size, config.n_ctx), device=device)

    def one():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model.loss(tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        one()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def run_demo(spec: str = "digits", out: str | Path | None = None, *, budget_minutes: float | None = None,
             steps: int | None = None, device: str | None = None, seed: int = 0, data_dir: str | None = None,
             log=print, progress: bool = True) -> dict:
    """Run every stage into `out` and return the summary (also written as `summary.json`)."""
    from igpt.probe import Split, linear_probe, summary
    from igpt.finetune import labelled_splits
    from igpt.sample import completion_rows, sample, save_grid
    from igpt.train import LN2, TrainConfig, Trainer, autocast, bf16_native, evaluate_split

    plan = plan_for(spec, budget_minutes)
    if steps is not None and steps <= 0:
        raise IgptError(f"--steps must be positive, got {steps}")
    dev = resolve_device(device)
    folder = Path(out) if out is not None else default_out(spec)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise IgptError(f"--out {folder} exists and is not empty: choose a new folder")
    kwargs = dict(data_dir=data_dir, crop=plan.crop)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    stages = 6

    def stage(i: int, text: str) -> float:
        log(f"[{i}/{stages}] {text}")
        return time.perf_counter()

    # 1. data and palette ---------------------------------------------------------------------
    t = stage(1, f"data and palette: {plan.describe()}")
    train_images = data.load(spec, "train", plan.resolution, require_labels=False, **kwargs)
    log(f"  {train_images.describe()}")
    palette = Palette.fit(train_images.images, clusters=plan.clusters, seed=seed, device=str(dev), log=log)
    folder.mkdir(parents=True, exist_ok=True)
    palette_path = folder / "palette.npy"
    palette.save(palette_path)
    timings["data and palette"] = time.perf_counter() - t

    # 2. pretraining --------------------------------------------------------------------------
    t = stage(2, "pretraining")
    overrides = dict(plan.overrides)
    model_config = ImageGPTConfig.from_preset(plan.model, vocab_size=palette.size, n_ctx=plan.resolution**2,
                                              **overrides)
    candidates = ("fp32", "bf16") if bf16_native(dev) else ("fp32",)  # emulated bf16 is not worth timing
    timed = {p: time_step(model_config, plan.batch_size, dev, p) for p in candidates}
    precision = min(timed, key=timed.get)
    train_seconds = plan.budget_minutes * 60 * TRAIN_SHARE
    n_steps = steps or max(20, int(train_seconds / (timed[precision] * 1.15)))  # 15% for data, validation, saving
    measured = ", ".join(f"{p} {s:.3f}" for p, s in timed.items()) + ("" if "bf16" in timed else ", bf16 not native")
    log(f"  {timed[precision]:.3f} s/step in {precision} ({measured}): "
        f"{n_steps} steps of batch {plan.batch_size} fit {train_seconds / 60:.1f} minutes")
    cfg = TrainConfig(data=spec, data_dir=data_dir, resolution=plan.resolution, crop=plan.crop,
                      palette=str(palette_path), clusters=plan.clusters, model=plan.model, overrides=overrides,
                      batch_size=plan.batch_size, lr=plan.lr, steps=n_steps, seed=seed, precision=precision,
                      device=str(dev), eval_every=max(1, n_steps // 10), save_every=n_steps, sample_every=n_steps,
                      eval_batches=16)
    run_dir = folder / "run"
    trainer = Trainer(cfg, run_dir, log=log, progress=progress)
    trainer.run()
    model = ImageGPT.from_pretrained(run_dir / "best").to(dev)
    timings["pretraining"] = time.perf_counter() - t

    # 3. bits per pixel -----------------------------------------------------------------------
    t = stage(3, "test bits per pixel")
    evaluation = evaluate_split(model, palette, spec, "test", precision=precision, **kwargs)
    atomic_write_json(folder / "eval.json", evaluation)
    base = evaluation["baselines"]
    log(f"  {evaluation['bits_per_pixel']:.3f} bits/pixel (uniform {base['uniform_bits_per_pixel']:.3f}, "
        f"unigram {base['unigram_bits_per_pixel']:.3f})")
    records = trainer.folder.metrics()
    plots.learning_curve(records, folder / "learning_curve.png", {
        "uniform": base["uniform_bits_per_pixel"], "unigram": base["unigram_bits_per_pixel"]})
    timings["evaluation"] = time.perf_counter() - t

    # 4. samples and completions -----------------------------------------------------------------
    t = stage(4, "samples and completions")
    generator = torch.Generator(device=dev).manual_seed(seed)
    with autocast(dev, precision):
        tokens = sample(model, 32, generator=generator)
    save_grid(palette.decode(tokens.cpu().numpy()), folder / "samples.png", columns=8)
    test_images = data.load(spec, "test", plan.resolution, **kwargs)
    keep = plan.resolution // 2
    with autocast(dev, precision):
        picks = np.sort(np.random.default_rng(seed).choice(len(test_images), min(8, len(test_images)), replace=False))
        rows = completion_rows(model, palette, np.asarray(test_images.images[picks]), keep, 4, generator=generator)
    save_grid(rows.reshape(-1, plan.resolution, plan.resolution, 3), folder / "completions.png", columns=6)
    timings["sampling"] = time.perf_counter() - t

    # 5. linear probes ------------------------------------------------------------------------
    t = stage(5, "linear probe of every layer, with raw-pixel and random-init baselines")
    probe = None
    if train_images.labels is not None and train_images.classes and len(train_images.classes) > 1:
        tokensets = labelled_splits(spec, plan.resolution, palette, **kwargs)
        splits = {name: Split.of(s, plan.probe_images, seed) for name, s in tokensets.items()}
        probe = linear_probe(model, splits, n_classes=len(train_images.classes), precision=precision, seed=seed,
                             log=log, progress=progress)
        probe["classes"] = list(train_images.classes)
        atomic_write_json(folder / "probe.json", probe)
        plots.probe_accuracy(probe, folder / "probe.png")
        log("  " + summary(probe).replace("\n", "\n  "))
    else:
        log("  skipped: the data has no class labels")
    timings["probe"] = time.perf_counter() - t

    # 6. report -------------------------------------------------------------------------------
    t = stage(6, "report")
    timings["report"] = 0.0
    timings["total"] = time.perf_counter() - t_all
    result = {
        "plan": dataclasses.asdict(plan), "steps": n_steps, "precision": precision, "device": str(dev),
        "seconds_per_step": timed[precision], "model": dataclasses.asdict(model.config),
        "n_params": sum(p.numel() for p in model.parameters()), "eval": evaluation,
        "best_val_bits_per_pixel": trainer.best_val / LN2, "probe": probe, "timings": timings,
    }
    _write_report(folder, result, records)
    timings["report"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t_all
    atomic_write_json(folder / "summary.json", result)
    log(_screen_summary(folder, result))
    return result


def _write_report(folder: Path, result: dict, records: list[dict]) -> None:
    plan, ev, probe = result["plan"], result["eval"], result["probe"]
    base = ev["baselines"]
    report = Report(f"Image GPT demo: {plan['data']}")
    report.paragraph(
        f"A {result['model']['n_layer']}-layer, width-{result['model']['n_embd']} Image GPT "
        f"({result['n_params']:,} parameters) pretrained with the autoregressive objective on {plan['data']} at "
        f"{plan['resolution']}x{plan['resolution']} with a {result['model']['vocab_size']}-colour palette, for "
        f"{result['steps']} steps of batch {plan['batch_size']} ({result['precision']}, {result['device']})."
    )
    report.heading("Likelihood")
    report.table(["", "bits per pixel"], [
        ["this model, test split (all images)", f"{ev['bits_per_pixel']:.3f}"],
        ["best validation (first batches)", f"{result['best_val_bits_per_pixel']:.3f}"],
        ["unigram (palette frequencies)", f"{base['unigram_bits_per_pixel']:.3f}"],
        ["uniform", f"{base['uniform_bits_per_pixel']:.3f}"],
    ])
    report.image("learning_curve.png", "learning curve", folder)
    report.heading("Samples")
    report.image("samples.png", "unconditional samples", folder)
    report.heading("Completions")
    report.paragraph("Each row: the test image with its bottom half hidden, four sampled completions, the original.")
    report.image("completions.png", "completions", folder)
    report.heading("Linear probe")
    if probe is None:
        report.paragraph("Skipped: the data has no class labels.")
    else:
        b = probe["baselines"]
        report.paragraph(
            f"Logistic regression on the mean-pooled normalised residual stream of each layer ({probe['n_train']:,} "
            f"training images, L2 chosen on {probe['n_val']:,} validation images, accuracy on {probe['n_test']:,} "
            f"test images). Best layer {probe['best_layer']}: **{100 * probe['best_test_acc']:.1f}%**, against "
            f"{100 * b['raw_pixels']:.1f}% for raw pixels, {100 * b['random_init']:.1f}% for the same network "
            f"randomly initialised and {100 * b['chance']:.1f}% chance."
        )
        report.paragraph(_probe_reading(probe))
        report.image("probe.png", "probe accuracy by layer", folder)
        random_by_layer = {row["layer"]: row for row in b["random_init_layers"]}
        report.table(["layer", "val acc", "test acc", "random-init test acc"], [
            [str(row["layer"]) + (" (best)" if row["layer"] == probe["best_layer"] else ""),
             f"{100 * row['val_acc']:.1f}%", f"{100 * row['test_acc']:.1f}%",
             f"{100 * random_by_layer[row['layer']]['test_acc']:.1f}%"]
            for row in probe["layers"]
        ])
    report.heading("Timings")
    report.table(["stage", "seconds"], [[name, f"{seconds:.1f}"] for name, seconds in result["timings"].items()])
    report.heading("Files")
    report.paragraph("`run/` is the run folder (`igpt sample --ckpt`, `igpt probe --ckpt`, `igpt finetune --ckpt` "
                     "take it); `summary.json`, `eval.json` and `probe.json` hold the numbers above.")
    report.write(folder / "report.md", folder / "report.html")


def _probe_reading(probe: dict) -> str:
    """The probe in words: against the baselines, and whether the paper's mid-depth peak shows."""
    b, best = probe["baselines"], probe["best_test_acc"]
    last = probe["layers"][-1]

    def points(x: float) -> str:
        return f"{abs(100 * x):.1f} points {'above' if x >= 0 else 'below'}"

    text = (f"The best layer is {points(best - b['raw_pixels'])} raw pixels and "
            f"{points(best - b['random_init'])} the randomly initialised network.")
    gap = best - last["test_acc"]
    if probe["best_layer"] < last["layer"] and gap >= 0.005:
        text += f" As in the paper, the peak comes before the last layer, which is {100 * gap:.1f} points lower."
    elif probe["best_layer"] < last["layer"]:
        text += (f" Validation accuracy peaks at layer {probe['best_layer']}, but on the test split the last layer "
                 f"is as good ({100 * abs(gap):.1f} points apart): at this scale the paper's mid-depth peak is "
                 "within noise.")
    else:
        text += " Here the last layer is the best one."
    if best < b["raw_pixels"]:
        text += (" Raw pixels win on this data: small, centred images are close to linearly separable, and a "
                 "few minutes of pretraining do not reach them; on CIFAR-10 the order reverses (see the README).")
    return text


def _screen_summary(folder: Path, result: dict) -> str:
    ev, probe = result["eval"], result["probe"]
    base = ev["baselines"]
    lines = [
        "",
        f"igpt demo finished in {result['timings']['total'] / 60:.1f} minutes: {folder}",
        f"  test bits/pixel  {ev['bits_per_pixel']:.3f}  (unigram {base['unigram_bits_per_pixel']:.3f}, "
        f"uniform {base['uniform_bits_per_pixel']:.3f})",
    ]
    if probe is not None:
        b = probe["baselines"]
        lines.append(f"  linear probe     {100 * probe['best_test_acc']:.1f}% at layer {probe['best_layer']}  "
                     f"(raw pixels {100 * b['raw_pixels']:.1f}%, random init {100 * b['random_init']:.1f}%, "
                     f"chance {100 * b['chance']:.1f}%)")
    lines.append(f"  report           {folder / 'report.html'}  (and report.md)")
    lines.append(f"  samples          {folder / 'samples.png'}, {folder / 'completions.png'}")
    return "\n".join(lines)
