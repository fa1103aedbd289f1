"""Evaluation: exact bits per pixel on a split (with its baselines), each pixel's bits (the surprise map), and
classification accuracy."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from igpt.batches import Stream, seed_of
from igpt.config import device_option, option, positive_int, seed_option
from igpt.data import DataConfig, TokenSet, split_option
from igpt.distributed import World, all_sum
from igpt.fileio import atomic_write_json
from igpt.model import BERT_MASK_RATE, ImageGPT, bert_mask, nll, token_nll
from igpt.palette import Palette
from igpt.plots import surprise_maps
from igpt.precision import autocast, precision_option

LN2 = math.log(2.0)


@torch.no_grad()
def evaluate(
    model: ImageGPT,
    tokens: np.ndarray,
    *,
    objective: str,
    batch_size: int = 64,
    precision: str = "fp32",
    world: World | None = None,
    max_batches: int | None = None,
    seed: int = 0,
) -> tuple[float, int]:
    """Mean NLL in nats per token over every image of `tokens` (or the first `max_batches` batches).

    Under torchrun each process takes every world-size-th batch and the sums are added up.
    BERT masks come from a fixed stream per batch, so the number is reproducible.
    """
    world = world or World(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    n = len(tokens) if max_batches is None else min(len(tokens), max_batches * batch_size)
    total = torch.zeros(2, dtype=torch.float64)
    for b, start in enumerate(range(world.rank * batch_size, n, batch_size * world.size)):
        batch = torch.from_numpy(tokens[start : min(start + batch_size, n)].astype(np.int64)).to(world.device)
        mask = None
        if objective == "bert":
            mask = bert_mask(tuple(batch.shape), seed_of(seed, Stream.EVAL_MASK, b, world.rank)).to(world.device)
        with autocast(world.device, precision):
            summed, count = nll(model(batch, mask), batch, mask)
        total += torch.stack([summed.double().cpu(), count.double().cpu()])
    total = all_sum(total.to(world.device), world).cpu()
    model.train(was_training)
    return float(total[0] / total[1].clamp(min=1)), int(total[1])


def unigram_nats(train_tokens: np.ndarray, eval_tokens: np.ndarray, vocab: int) -> float:
    """Cross-entropy of the palette-frequency (unigram) model of the training split, add-one smoothed."""
    counts = np.ones(vocab, dtype=np.float64)
    for start in range(0, len(train_tokens), 4096):
        counts += np.bincount(train_tokens[start : start + 4096].ravel(), minlength=vocab)[:vocab]
    logp = np.log(counts / counts.sum())
    seen = np.zeros(vocab, dtype=np.float64)
    for start in range(0, len(eval_tokens), 4096):
        seen += np.bincount(eval_tokens[start : start + 4096].ravel(), minlength=vocab)[:vocab]
    return float(-(seen * logp).sum() / max(1.0, seen.sum()))


@dataclass(kw_only=True)
class EvalConfig:
    """`igpt eval`'s settings: which run and split, how, and where the result goes."""

    ckpt: str = option(help="run folder")
    split: str = split_option("the split measured")
    batch_size: int = option(64, "images per forward pass", type=positive_int)
    device: str | None = device_option()
    precision: str = precision_option()
    json: str | None = option(None, "also write the result as JSON (eval.json when no file is named)", nargs="?",
                              const="eval.json")


def evaluate_split(model: ImageGPT, palette: Palette, data: DataConfig, split: str = "test", *,
                   batch_size: int = 64, precision: str = "fp32") -> dict:
    """Exact loss of `model` on a whole split, with the uniform and unigram (palette-frequency) baselines."""
    data = data.replace(resolution=model.config.side)
    tokens = data.tokens(split, palette)
    nats, n_tokens = evaluate(model, tokens.tokens, objective=model.config.objective, batch_size=batch_size,
                              precision=precision)
    unigram = unigram_nats(data.tokens("train", palette).tokens, tokens.tokens, palette.size)
    return {
        "nats_per_token": nats, "bits_per_pixel": nats / LN2, "n_images": len(tokens), "n_tokens": n_tokens,
        "objective": model.config.objective, "split": split,
        "baselines": {"uniform_bits_per_pixel": math.log2(palette.size), "unigram_bits_per_pixel": unigram / LN2},
    }


@torch.no_grad()
def pixel_bits(model: ImageGPT, tokens: torch.Tensor, *, rounds: int = 2, seed: int = 0, precision: str = "fp32",
               batch_size: int = 64) -> torch.Tensor:
    """Each pixel's surprise under the model, in bits: (N, side, side) for tokens (N, n).

    Autoregressive: -log2 p(x_i | x_<i), one forward pass. BERT has no such quantity, so its map
    is the masked objective's own estimate: `rounds` seeded random partitions of the pixels into
    groups of the training mask rate, each group masked in turn, so every pixel is predicted
    `rounds` times from the rest of the image and the bits are averaged.
    """
    device = next(model.parameters()).device
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    if len(tokens) > batch_size:
        return torch.cat([pixel_bits(model, part, rounds=rounds, seed=seed, precision=precision, batch_size=batch_size)
                          for part in tokens.split(batch_size)])
    tokens = tokens.to(device)
    n, n_ctx = tokens.shape
    was_training = model.training
    model.eval()
    with autocast(device, precision):
        if model.config.objective == "ar":
            nats = token_nll(model(tokens), tokens)
        else:
            nats = torch.zeros(n, n_ctx, device=device)
            group = max(1, round(BERT_MASK_RATE * n_ctx))
            for r in range(rounds):
                order = torch.randperm(n_ctx, generator=torch.Generator().manual_seed(seed_of(seed, Stream.EVAL_MASK, r)))
                for positions in order.to(device).split(group):
                    mask = torch.zeros(n, n_ctx, dtype=torch.bool, device=device)
                    mask[:, positions] = True
                    nats[:, positions] += token_nll(model(tokens, mask), tokens)[:, positions]
            nats /= rounds
    model.train(was_training)
    side = model.config.side
    return (nats / LN2).view(n, side, side).cpu()


@dataclass(kw_only=True)
class SurpriseConfig:
    """`igpt surprise`'s settings: which run and images, how, and where the maps go."""

    ckpt: str = option(help="run folder (or a converted model folder)")
    images: tuple[str, ...] = option((), "image files (any size: centre-cropped, resized); without them, the first "
                                     "--n images of --split", flag="images", nargs="*")
    split: str = split_option("the split whose first --n images are mapped, without image files")
    n: int = option(4, "number of images from --split", type=positive_int)
    rounds: int = option(2, "bert: times each pixel is masked and predicted", type=positive_int)
    seed: int = seed_option("bert: seed of the masks")
    device: str | None = device_option()
    precision: str = precision_option()
    out: str = option(help="output PNG: each image beside its heat map")
    json: str | None = option(None, "also write every pixel's bits as JSON")


def write_surprise(model: ImageGPT, palette: Palette, images: np.ndarray, names: list[str], cfg: SurpriseConfig, *,
                   log: Callable[[str], None] = print) -> torch.Tensor:
    """The surprise command's whole job: each image's per-pixel bits (returned, (N, R, R)), drawn beside it into
    `cfg.out`, and with `cfg.json` written as JSON."""
    bits = pixel_bits(model, palette.encode(images).astype(np.int64), rounds=cfg.rounds, seed=cfg.seed,
                      precision=cfg.precision)
    surprise_maps(images, bits.numpy(), names, cfg.out)
    log(f"wrote {cfg.out}: bits/pixel " + ", ".join(f"{b.mean():.2f}" for b in bits))
    if cfg.json:
        atomic_write_json(cfg.json, {"images": names, "bits_per_pixel": [float(b.mean()) for b in bits],
                                     "pixel_bits": bits.tolist(), "objective": model.config.objective})
    return bits


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
            _, logits = model(batch, classes=True)
        out.append(logits.float().softmax(-1).cpu().numpy())
    model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, model.config.n_classes), np.float32)


def accuracy(model: ImageGPT, split: TokenSet, batch_size: int = 256, precision: str = "fp32") -> float:
    probs = predict(model, split.tokens, batch_size, precision)
    return float((probs.argmax(1) == np.asarray(split.labels)).mean())
