"""Pretraining (docs/reference.md §4-5): the generative objective on a data set's training split.

What it plugs into the loop of train.py: a palette (fitted, the released one, or a file),
the model built from a preset for that palette and resolution, batches of training tokens
(or random resized crops of the pixels with --augment), validation bits per pixel, and
sample grids as the run goes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from igpt.batches import Batches, ResizedCrops
from igpt.checkpoint import RunFolder
from igpt.config import check, option
from igpt.data import DataConfig
from igpt.distributed import World, on_main
from igpt.errors import IgptError
from igpt.evaluate import LN2, evaluate
from igpt.model import ATTENTIONS, OBJECTIVES, POSITIONS, PRESETS, ImageGPT, ImageGPTConfig
from igpt.palette import Palette
from igpt.plan import (BUDGET_MINUTES, PALETTE_SIZES, PAPER_RESOLUTION, PIXELS_PER_MINUTE, budget_minutes,
                       palette_size, resolution_for)
from igpt.precision import autocast
from igpt.runrecord import RunInfo
from igpt.train import Task, TrainConfig, inherited


DEFAULT_ATTENTION = {"ar": "strided", "bert": "dense"}  # without --attention


def resolve_attention(attention: str | None, objective: str) -> str:
    """--attention as given, else the objective's default: what the model, run.json and resume checks see."""
    return attention or DEFAULT_ATTENTION.get(objective, "dense")


@dataclass
class PretrainConfig(TrainConfig):
    """Pretraining's settings: the loop's, plus the palette, the model and the objective."""

    palette: str = option("fit", "fit | openai | PATH to a palette")
    clusters: int | None = option(None, f"palette size when fitting (default: a colour per pixel of an image, "
                                        f"{PALETTE_SIZES[0]} to {PALETTE_SIZES[1]}, at most the data's distinct "
                                        "colours)")
    minutes: float | None = inherited(
        TrainConfig, "minutes", None,
        f"{TrainConfig.__dataclass_fields__['minutes'].metadata['help']} (default: a minute per "
        f"{PIXELS_PER_MINUTE:,} training pixels, {BUDGET_MINUTES[0]:g} to {BUDGET_MINUTES[1]:g}, without --steps or "
        "--epochs)")
    model: str = option("tiny", "preset: " + ", ".join(PRESETS))
    n_layer: int | None = option(None, "override the preset's depth")
    n_embd: int | None = option(None, "override the preset's width")
    n_head: int | None = option(None, "override the preset's head count")
    objective: str = option("ar", "ar (next pixel) | bert (masked pixels)", choices=OBJECTIVES)
    # The defaults are not the paper's: 2-D positions and strided attention learned the best features per
    # CPU-minute in the study of docs/design.md ("Defaults"); --positions 1d --attention dense is the paper.
    positions: str = option("2d", "2d (learned row + column vectors) | 1d (one learned vector per pixel, the paper)",
                            choices=POSITIONS)
    attention: str | None = option(None, "strided (Sparse Transformer: last row's width, then the pixel's column; "
                                   "the default for ar) | dense (the paper; the default for bert, which sees every "
                                   "pixel) | local (the --window-rows rows before each pixel)", choices=ATTENTIONS)
    window_rows: int = option(2, "local attention: rows of earlier pixels each pixel sees")
    augment: bool = option(False, "random resized crops of the training images")
    sample_every: int = option(500, "steps between sample grids (ar)")

    def __post_init__(self):
        super().__post_init__()
        check([(self.clusters is None or self.clusters > 0, "--clusters must be positive"),
               (self.sample_every > 0, "--sample-every must be positive")])

    def model_config(self, palette_size: int, resolution: int) -> ImageGPTConfig:
        """The preset with its overrides, for this palette and resolution (a bad one fails before any work)."""
        shape = {name: getattr(self, name) for name in ("n_layer", "n_embd", "n_head")
                 if getattr(self, name) is not None}
        return ImageGPTConfig.from_preset(self.model, vocab_size=palette_size, n_ctx=resolution**2,
                                          objective=self.objective, positions=self.positions,
                                          attention=resolve_attention(self.attention, self.objective),
                                          window_rows=self.window_rows, **shape)


LENGTH_FIELDS = ("steps", "epochs", "minutes")  # any one of them given, the run's length is the user's


def planned(data: dict, pretrain: dict, resuming: str | Path | None = None) -> tuple[DataConfig, PretrainConfig]:
    """`igpt train`'s settings: the DataConfig and PretrainConfig fields given (`data`, `pretrain`), and for those
    not given the data's plan (igpt.plan): the resolution and, without --steps, --epochs or --minutes, a budget in
    minutes (Pretraining sizes the palette). `resuming`: a run folder to continue, whose recorded resolution,
    palette size and budget stand in for the plan, so that a run resumes as it began."""
    cfg = PretrainConfig(**pretrain)  # a bad flag fails before any image is read
    unsized = all(getattr(cfg, name) is None for name in LENGTH_FIELDS)
    run = RunInfo.read(resuming) if resuming is not None else RunInfo()
    if run.kind == "pretrain":
        recorded = {"clusters": run.config.get("clusters") if cfg.clusters is None else cfg.clusters,
                    "minutes": run.config.get("minutes") if unsized else cfg.minutes}
        return DataConfig(**{"resolution": run.data.resolution, **data}), dataclasses.replace(cfg, **recorded)
    described = DataConfig(**{"resolution": PAPER_RESOLUTION, **data})
    if "resolution" not in data:
        described = described.replace(resolution=resolution_for(described))
    if unsized:
        cfg = dataclasses.replace(cfg, minutes=budget_minutes(len(described.images("train").images), described.resolution))
    return described, cfg


def describe_plan(data: DataConfig, cfg: PretrainConfig, colours: int) -> str:
    """"digits at 8x8, 17-colour palette, tiny model (4 layers, width 128, 2d positions, strided attention)"."""
    shape, r = cfg.model_config(colours, data.resolution), data.resolution
    pattern = "" if shape.is_paper else f", {shape.positions} positions, {shape.attention} attention"
    layers = f"{shape.n_layer} layer{'s' if shape.n_layer != 1 else ''}"
    return (f"{Path(data.name).name} at {r}x{r}, {colours}-colour palette, {cfg.model} model ({layers}, width "
            f"{shape.n_embd}{pattern})")


def resolve_palette(cfg: PretrainConfig, data: DataConfig, log) -> Palette:
    """--palette: fit one on the training pixels, or load the released one or a file."""
    if cfg.palette == "fit":
        return Palette.fit(data.images("train").images, clusters=cfg.clusters, seed=cfg.seed, log=log)
    return Palette.load(cfg.palette)


def augment_source(data: DataConfig) -> np.ndarray:
    """Pixels to crop from: the native size when uniform and large enough, else twice the input resolution."""
    try:
        native = data.images("train", native=True)
        if native.resolution >= data.resolution:
            return native.images
    except IgptError:
        pass
    return data.images("train", resolution=2 * data.resolution).images


class Pretraining(Task):
    kind = "pretrain"

    def __init__(self, data: DataConfig, cfg: PretrainConfig):
        """Without --clusters, a palette to fit gets igpt.plan's size for the training images (which run.json then
        records, as it records a given one)."""
        cfg.model_config(1, data.resolution)  # a bad preset or override fails before any file
        if cfg.clusters is None and cfg.palette == "fit":
            cfg = dataclasses.replace(cfg, clusters=palette_size(data.images("train").images))
        self.data, self.cfg = data, cfg

    def record(self) -> dict:
        """With the attention the model has, so that a run made without --attention resumes with it given."""
        record = super().record()
        record["config"]["attention"] = resolve_attention(self.cfg.attention, self.cfg.objective)
        return record

    def describe(self) -> str:
        return f"{describe_plan(self.data, self.cfg, self.palette.size)}, {self.cfg.objective} objective"

    def prepare(self, folder: RunFolder, resume: bool, world: World, log) -> None:
        cfg, data = self.cfg, self.data
        torch.manual_seed(cfg.seed)

        def palette_and_caches() -> Palette:  # once, on rank 0: the others then read the caches
            palette = folder.palette() if resume else resolve_palette(cfg, data, log)
            for split in ("train", "val"):
                data.tokens(split, palette)
            return palette

        self.palette = on_main(world, palette_and_caches)
        train = data.tokens("train", self.palette)
        self.val = data.tokens("val", self.palette)
        augment = ResizedCrops(augment_source(data), data.resolution, self.palette) if cfg.augment else None
        self.batches = Batches(cfg.batch_size, cfg.seed, train.tokens, augment=augment)
        self.model = ImageGPT(cfg.model_config(self.palette.size, data.resolution))

    def validate(self, model: torch.nn.Module, world: World) -> dict[str, float]:
        cfg = self.cfg
        loss, _ = evaluate(model, self.val.tokens, objective=cfg.objective, batch_size=cfg.micro_batch,
                           precision=cfg.precision, world=world, max_batches=cfg.eval_batches)
        return {"val_loss": loss, "val_bits_per_pixel": loss / LN2}

    def after_step_every(self) -> int | None:
        return self.cfg.sample_every if self.cfg.objective == "ar" else None

    def after_step(self, trainer, step: int, last: bool, folder: RunFolder) -> None:
        """A grid of samples every `sample_every` steps and at the end (ar; not under multi-process FSDP)."""
        world, cfg = trainer.world, self.cfg
        if not (step % cfg.sample_every == 0 or last) or not world.is_main or cfg.objective != "ar":
            return
        if cfg.fsdp and world.distributed:
            return
        from igpt.grids import save_grid
        from igpt.sample import sample

        gen = torch.Generator(device=world.device).manual_seed(cfg.seed)
        with autocast(world.device, cfg.precision):
            tokens = sample(trainer.model, 16, generator=gen)
        save_grid(self.palette.decode(tokens.cpu().numpy()), folder.path / "samples" / f"step_{step:07d}.png")
