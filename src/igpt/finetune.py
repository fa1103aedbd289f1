"""Fine-tuning (SPEC 6): a pretrained model plus a linear classifier, trained end to end.

The classifier (zero-initialised) reads the mean-pooled final-norm output. The loss is
gen_weight * L_GEN + L_CLF, with the pretraining betas, a constant learning rate about 10x
below pretraining's, reflect-pad + random crop + flip augmentation, and early stopping on
validation accuracy. The output folder holds the best model (by validation accuracy), its
palette, `run.json` with the class names, `metrics.jsonl`, and `finetune.json` with the
test accuracy, so `igpt classify` needs only that folder.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from igpt import data
from igpt.checkpoint import RUN_CONFIG, RunFolder
from igpt.distributed import resolve_device
from igpt.errors import IgptError
from igpt.fileio import atomic_write_json
from igpt.model import ImageGPT
from igpt.palette import Palette
from igpt.train import autocast, bert_mask, load_run, run_data, step_seed

RESULT = "finetune.json"


@dataclass
class FinetuneConfig:
    ckpt: str
    data: str | None = None  # default: the data set the checkpoint was pretrained on
    data_dir: str | None = None
    crop: bool = False
    skip_bad: bool = False
    gen_weight: float = 1.0
    lr: float | None = None  # default: pretraining lr / 10 (from scratch: the pretraining lr)
    epochs: float = 10.0
    batch_size: int = 64
    patience: int = 3  # validations without improvement before stopping
    eval_every: int | None = None  # steps; default once per epoch
    augment: bool = True
    flip: bool = True  # off for data whose mirror image changes the class (digits)
    from_scratch: bool = False  # the same network, randomly initialised: the no-pretraining control
    seed: int = 0
    precision: str = "fp32"
    device: str | None = None

    def __post_init__(self):
        checks = [
            (self.gen_weight >= 0 and math.isfinite(self.gen_weight), "--gen-weight must be >= 0"),
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), "--lr must be a positive number"),
            (self.epochs > 0, "--epochs must be positive"),
            (self.batch_size > 0, "--batch-size must be positive"),
            (self.patience > 0, "--patience must be positive"),
            (self.eval_every is None or self.eval_every > 0, "--eval-every must be positive"),
            (self.precision in ("fp32", "bf16"), f"--precision must be fp32 or bf16, got {self.precision!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise IgptError(message)


def labelled_splits(spec: str, resolution: int, palette: Palette, **kwargs) -> dict[str, data.TokenSet]:
    """train, val and test of a labelled data set, encoded through `palette`."""
    splits = {name: data.load_tokens(spec, name, resolution, palette, require_labels=True, **kwargs)
              for name in ("train", "val", "test")}
    if len(splits["train"].classes or []) < 2:
        raise IgptError(f"{spec} has fewer than two classes: nothing to classify")
    return splits


@torch.no_grad()
def predict(model: ImageGPT, tokens: np.ndarray, batch_size: int = 256, precision: str = "fp32") -> np.ndarray:
    """Class probabilities (N, n_classes) for tokenised images."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(tokens), batch_size):
        batch = torch.from_numpy(np.asarray(tokens[start : start + batch_size]).astype(np.int64)).to(device)
        with autocast(device, precision):
            _, logits = model.classify(batch)
        out.append(logits.float().softmax(-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.config.n_classes), np.float32)


def accuracy(model: ImageGPT, split: data.TokenSet, batch_size: int = 256, precision: str = "fp32") -> float:
    probs = predict(model, split.tokens, batch_size, precision)
    return float((probs.argmax(1) == np.asarray(split.labels)).mean())


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


class Finetuner:
    """One fine-tuning run from `cfg.ckpt` into the folder `out`; `run()` returns the result."""

    def __init__(self, cfg: FinetuneConfig, out: str | Path, log=print, progress: bool = True):
        self.cfg, self.log, self.progress = cfg, log, progress
        self.device = resolve_device(cfg.device)
        pretrained, self.palette, self.source_run = load_run(cfg.ckpt, "cpu")
        pretrain_cfg = self.source_run.get("train", {})
        spec, kwargs = run_data(self.source_run, cfg.data, cfg.data_dir, cfg.crop, cfg.skip_bad)
        self.resolution = math.isqrt(pretrained.config.n_ctx)
        self.splits = labelled_splits(spec, self.resolution, self.palette, **kwargs)
        self.classes = list(self.splits["train"].classes)
        self.data_spec = spec
        base_lr = pretrain_cfg.get("lr", 3e-3)
        self.lr = cfg.lr if cfg.lr is not None else (base_lr if cfg.from_scratch else base_lr / 10)
        self.folder = RunFolder(out)
        self.folder.prepare(resume=False, config=None, differences=None, resumable=False)
        self.model = classifier_model(pretrained, len(self.classes), cfg.from_scratch, cfg.seed).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=self.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                           fused=True)
        n_train = len(self.splits["train"])
        if n_train < cfg.batch_size:
            self.folder.discard_if_empty()
            raise IgptError(f"--batch-size {cfg.batch_size} exceeds the {n_train} training images; lower it")
        self.per_epoch = n_train // cfg.batch_size
        self.total = max(1, math.ceil(cfg.epochs * self.per_epoch))
        self.eval_every = cfg.eval_every or self.per_epoch

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step`'s images (augmented from pixels when asked) and labels, a function of (seed, step)."""
        train, size = self.splits["train"], self.cfg.batch_size
        epoch, i = divmod(step, self.per_epoch)
        order = np.random.default_rng(step_seed(self.cfg.seed, epoch, 3)).permutation(len(train))
        idx = np.sort(order[i * size : (i + 1) * size])
        if self.cfg.augment:
            rng = np.random.default_rng(step_seed(self.cfg.seed, step, 4))
            pad = max(1, round(4 * self.resolution / 32))  # the paper's 4 pixels at 32x32, scaled
            pixels = data.pad_crop_flip(np.asarray(train.images.images[idx]), rng, pad=pad, flip=self.cfg.flip)
            tokens = self.palette.encode(pixels)
        else:
            tokens = np.asarray(train.tokens[idx])
        return torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(np.asarray(train.labels)[idx].astype(np.int64))

    def _loss(self, tokens: torch.Tensor, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, float, float]:
        mask = None
        if self.model.config.objective == "bert" and self.cfg.gen_weight > 0:
            mask = bert_mask(tuple(tokens.shape), step_seed(self.cfg.seed, step, 5)).to(tokens.device)
        gen_logits, class_logits = self.model.classify(tokens, mask)
        clf = F.cross_entropy(class_logits.float(), labels)
        if self.cfg.gen_weight == 0:
            return clf, float(clf.detach()), math.nan
        nll = F.cross_entropy(gen_logits.float().flatten(0, 1), tokens.flatten(), reduction="none")
        gen = nll.mean() if mask is None else (nll * mask.flatten()).sum() / mask.sum().clamp(min=1)
        return clf + self.cfg.gen_weight * gen, float(clf.detach()), float(gen.detach())

    def _save_best(self, step: int, val_acc: float) -> None:
        RunFolder.save_model(self.folder.path, self.model, self.palette, None)
        atomic_write_json(self.folder.path / RUN_CONFIG, {
            "finetune": dataclasses.asdict(self.cfg), "train": self.source_run.get("train", {}),
            "data": self.data_spec, "classes": self.classes, "step": step, "best_val_acc": val_acc,
            "palette_hash": self.palette.hash,
        })

    def run(self) -> dict:
        cfg, t_start = self.cfg, time.perf_counter()
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total, desc="finetune", unit="step", dynamic_ncols=True)
        best_acc, best_step, stale, step = -1.0, 0, 0, 0
        self.model.train()
        try:
            for step in range(self.total):
                tokens, labels = (t.to(self.device) for t in self._batch(step))
                with autocast(self.device, cfg.precision):
                    loss, clf, gen = self._loss(tokens, labels, step)
                if not math.isfinite(float(loss)):
                    raise IgptError(f"the loss became non-finite at step {step + 1}: lower --lr or use --precision fp32")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                record = {"step": step + 1, "loss": float(loss), "clf_loss": clf, "lr": self.lr}
                if not math.isnan(gen):
                    record["gen_loss"] = gen
                self.folder.log_metrics(record)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss):.4f}", clf=f"{clf:.4f}")
                if (step + 1) % self.eval_every == 0 or step + 1 == self.total:
                    val_acc = accuracy(self.model, self.splits["val"], precision=cfg.precision)
                    self.folder.log_metrics({"step": step + 1, "val_acc": val_acc})
                    message = f"step {step + 1}: validation accuracy {100 * val_acc:.2f}%"
                    if val_acc > best_acc:
                        best_acc, best_step, stale = val_acc, step + 1, 0
                        self._save_best(step + 1, val_acc)
                    else:
                        stale += 1
                    if bar is not None:
                        bar.write(message)
                    else:
                        self.log(message)
                    if stale >= cfg.patience:
                        self.log(f"early stop: no better validation accuracy for {stale} validations")
                        break
        finally:
            if bar is not None:
                bar.close()
        best = ImageGPT.from_pretrained(self.folder.path).to(self.device)
        test_acc = accuracy(best, self.splits["test"], precision=cfg.precision)
        result = {"test_acc": test_acc, "best_val_acc": best_acc, "best_step": best_step, "steps": step + 1,
                  "epochs": (step + 1) / self.per_epoch, "lr": self.lr, "gen_weight": cfg.gen_weight,
                  "from_scratch": cfg.from_scratch, "n_train": len(self.splits["train"]),
                  "n_test": len(self.splits["test"]), "seconds": time.perf_counter() - t_start}
        atomic_write_json(self.folder.path / RESULT, result)
        self.log(f"test accuracy {100 * test_acc:.2f}% (best validation {100 * best_acc:.2f}% at step {best_step}); "
                 f"model in {self.folder.path}")
        return result


def load_classifier(path: str | Path, device: str | None = None) -> tuple[ImageGPT, Palette, list[str] | None]:
    """A fine-tuned model, its palette and its class names, from a `Finetuner` output folder."""
    model, palette, run = load_run(path, device)
    if model.classifier is None:
        raise IgptError(f"{path} has no classifier head: fine-tune it first with igpt finetune")
    classes = run.get("classes")
    return model, palette, list(classes) if classes else None
