"""Fine-tuning (docs/reference.md §6.2): a pretrained model plus a linear classifier, trained end to end.

What it plugs into the loop of train.py: the classifier (zero-initialised) reads the
mean-pooled final-norm output; the loss is gen_weight * L_GEN + L_CLF; batches are
reflect-pad + random crop + flip augmented; the learning rate is constant, about 10x below
pretraining's; validation accuracy picks the best model and stops the run early. The
output folder is a run folder like pretraining's (exact --resume included) whose run.json
also names the classes, and `finetune.json` holds the test accuracy of the best model, so
`igpt classify` needs only that folder.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from igpt.batches import Batches, PadCropFlip
from igpt.checkpoint import BEST, RunFolder, load_run
from igpt.config import RunFolderOptions, check, device_option, option
from igpt.data import labelled_splits
from igpt.distributed import World
from igpt.errors import IgptError
from igpt.evaluate import accuracy
from igpt.fileio import atomic_write_json
from igpt.model import ImageGPT
from igpt.palette import Palette
from igpt.runrecord import RunInfo
from igpt.train import Task, TrainConfig, inherited

RESULT = "finetune.json"


@dataclass
class FinetuneConfig(TrainConfig):
    """Fine-tuning's settings: the loop's with the paper's fine-tuning defaults, plus the classifier's."""

    lr: float | None = inherited(TrainConfig, "lr", None, "learning rate (default: the pretraining lr / 10; "
                                 "from scratch: the pretraining lr)")
    schedule: str = inherited(TrainConfig, "schedule", "constant")
    warmup: int | None = inherited(TrainConfig, "warmup", 0, "warm-up steps")
    epochs: float | None = inherited(TrainConfig, "epochs", 10.0)
    eval_every: int | None = inherited(TrainConfig, "eval_every", None, "steps between validations (default: an epoch)")
    save_every: int | None = inherited(TrainConfig, "save_every", None,
                                       "steps between checkpoints (default: at every validation)")
    patience: int | None = inherited(TrainConfig, "patience", 3)
    gen_weight: float = option(1.0, "weight of L_GEN beside L_CLF (0 allowed)")
    augment: bool = option(True, "reflect-pad, random crop and flip the training images")
    flip: bool = option(True, "mirror images when augmenting (off for digits and text)")
    from_scratch: bool = option(False, "same network, random weights: the no-pretraining control")

    def __post_init__(self):
        super().__post_init__()
        check([(self.gen_weight >= 0 and math.isfinite(self.gen_weight), "--gen-weight must be >= 0")])


@dataclass(kw_only=True)
class FinetuneRun(RunFolderOptions):
    """Which pretrained run `igpt finetune` starts from; its own run folder is RunFolderOptions'."""

    ckpt: str = option(help="pretrained run folder")


def classifier_model(pretrained: ImageGPT, n_classes: int, from_scratch: bool, seed: int) -> ImageGPT:
    """The pretrained network (or a fresh one of its shape) with a zero-initialised n_classes head."""
    config = dataclasses.replace(pretrained.config, n_classes=n_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ImageGPT(config)
    if not from_scratch:
        state = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("classifier.")}
        model.load_state_dict(state, strict=False)
    return model


class Finetuning(Task):
    kind = "finetune"
    score_name = "val_acc"
    higher_is_better = True

    def __init__(self, ckpt: str | Path, cfg: FinetuneConfig, data_changes: dict | None = None):
        """Everything is checked and loaded here, before the run folder is touched."""
        pretrained, self.palette, source = load_run(ckpt, "cpu")
        self.source = str(Path(ckpt))
        self.data = source.data_for(pretrained.config, **(data_changes or {}))
        self.splits = labelled_splits(self.data, self.palette)
        self.classes = list(self.splits["train"].classes)
        if cfg.lr is None:
            base = source.config.get("lr") or TrainConfig.lr
            cfg = dataclasses.replace(cfg, lr=base if cfg.from_scratch else base / 10)
        self.cfg, self.gen_weight = cfg, cfg.gen_weight
        train = self.splits["train"]
        augment = PadCropFlip(train.images.images, self.palette, cfg.flip) if cfg.augment else None
        self.batches = Batches(cfg.batch_size, cfg.seed, train.tokens, labels=train.labels, augment=augment)
        self.model = classifier_model(pretrained, len(self.classes), cfg.from_scratch, cfg.seed)
        self.started = time.perf_counter()

    def record(self) -> dict:
        return {**super().record(), "source": self.source, "classes": self.classes}

    def prepare(self, folder: RunFolder, resume: bool, world: World, log) -> None:
        self.log = log

    def validate(self, model: torch.nn.Module, world: World) -> dict[str, float]:
        return {"val_acc": accuracy(model, self.splits["val"], precision=self.cfg.precision)}

    def finish(self, trainer, summary: dict) -> dict:
        """Test accuracy of the best model (by validation accuracy), written to finetune.json."""
        if not trainer.world.is_main:
            return summary
        best = ImageGPT.from_pretrained(trainer.folder.path / BEST).to(trainer.world.device)
        test_acc = accuracy(best, self.splits["test"], precision=self.cfg.precision)
        best_step = max((r["step"] for r in trainer.folder.metrics() if r.get("val_acc") == trainer.best), default=0)
        result = {"test_acc": test_acc, "best_val_acc": trainer.best, "best_step": best_step, "steps": summary["step"],
                  "epochs": summary["step"] / self.batches.per_epoch, "lr": self.cfg.lr,
                  "gen_weight": self.cfg.gen_weight, "from_scratch": self.cfg.from_scratch,
                  "n_train": len(self.splits["train"]), "n_test": len(self.splits["test"]),
                  "seconds": time.perf_counter() - self.started}
        atomic_write_json(trainer.folder.path / RESULT, result)
        self.log(f"test accuracy {100 * test_acc:.2f}% (best validation {100 * trainer.best:.2f}% at step "
                 f"{best_step}); model in {trainer.folder.path / BEST}")
        return result


def load_classifier(path: str | Path, device: str | None = None) -> tuple[ImageGPT, Palette, list[str] | None]:
    """A fine-tuned model (its best, by validation accuracy), its palette and its class names."""
    path = Path(path)
    model, palette, _ = load_run(path / BEST if (path / BEST).is_dir() else path, device)
    if model.classifier is None:
        raise IgptError(f"{path} has no classifier head: fine-tune it first with igpt finetune")
    return model, palette, RunInfo.read(path).classes


@dataclass(kw_only=True)
class ClassifyConfig:
    """`igpt classify`'s settings."""

    ckpt: str = option(help="fine-tuned folder (from igpt finetune)")
    images: tuple[str, ...] = option(help="image files", flag="images", nargs="+", metavar="IMAGE")
    crop: bool = option(False, "centre-crop to square before resizing")
    device: str | None = device_option()
