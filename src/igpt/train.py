"""Pretraining (SPEC 4-5): the loop around an untouched model.

Every random choice of step s (which images, their crops, the BERT mask) is derived from
(seed, s), never from a stream that must be carried along. So a resumed run, a run with
gradient accumulation and a run on N processes all see exactly the same global batches,
and the run folder needs no RNG state to continue bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from queue import Queue

import numpy as np
import torch
import torch.nn.functional as F

from igpt import data
from igpt.checkpoint import RunFolder
from igpt.distributed import World, all_sum, full_state, init_world, load_full_state, no_sync, on_main, wrap
from igpt.errors import IgptError
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.palette import Palette

LN2 = math.log(2.0)
BERT_MASK_RATE = 0.15


@dataclass
class TrainConfig:
    """What defines a run. Fields in RUNTIME_FIELDS may change on --resume; the rest may not."""

    data: str = "digits"
    data_dir: str | None = None
    resolution: int = 8
    crop: bool = False
    augment: bool = False
    palette: str = "fit"
    clusters: int = 512
    model: str = "tiny"
    overrides: dict = field(default_factory=dict)
    objective: str = "ar"
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 3e-3
    warmup: int | None = None
    steps: int | None = None
    epochs: float | None = None
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "fp32"
    device: str | None = None
    compile: bool = False
    fsdp: bool = False
    skip_bad: bool = False
    eval_every: int = 100
    save_every: int = 200
    sample_every: int = 500
    eval_batches: int | None = None

    def __post_init__(self):
        checks = [
            (self.resolution > 0, "--resolution must be positive"),
            (self.batch_size > 0, "--batch-size must be positive"),
            (self.grad_accum > 0, "--grad-accum must be positive"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr must be a positive number"),
            (self.steps is None or self.steps > 0, "--steps must be positive"),
            (self.epochs is None or self.epochs > 0, "--epochs must be positive"),
            (self.steps is None or self.epochs is None, "give --steps or --epochs, not both"),
            (self.warmup is None or self.warmup >= 0, "--warmup must be >= 0"),
            (self.objective in ("ar", "bert"), f"--objective must be ar or bert, got {self.objective!r}"),
            (self.precision in ("fp32", "bf16"), f"--precision must be fp32 or bf16, got {self.precision!r}"),
            (self.batch_size % self.grad_accum == 0, "--batch-size must be divisible by --grad-accum"),
            (min(self.eval_every, self.save_every, self.sample_every) > 0, "intervals must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise IgptError(message)


RUNTIME_FIELDS = {"device", "compile", "fsdp", "eval_every", "save_every", "sample_every", "eval_batches", "skip_bad"}


def config_differences(saved: dict, now: TrainConfig) -> list[str]:
    current = dataclasses.asdict(now)
    return [
        f"{name} {saved.get(name)!r} (run) vs {current[name]!r} (now)"
        for name in current
        if name not in RUNTIME_FIELDS and saved.get(name) != current[name]
    ]


# ---- learning rate --------------------------------------------------------------------------
def learning_rate(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up from 0 over `warmup` steps, then cosine decay to 0 at `total` (SPEC 5)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---- batches ---------------------------------------------------------------------------------
def step_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class Batches:
    """The global batch of any step, as tokens, from the tokenised cache or augmented pixels."""

    def __init__(self, size: int, seed: int, tokens=None, pixels=None, palette=None, resolution=None):
        self.source = tokens if tokens is not None else pixels
        self.tokens, self.pixels, self.palette, self.resolution = tokens, pixels, palette, resolution
        self.size, self.seed = size, seed
        if len(self.source) < size:
            raise IgptError(f"--batch-size {size} exceeds the {len(self.source)} training images; lower it")
        self.per_epoch = len(self.source) // size
        self._order: tuple[int, np.ndarray] | None = None

    def indices(self, step: int) -> np.ndarray:
        epoch, i = divmod(step, self.per_epoch)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng(step_seed(self.seed, epoch)).permutation(len(self.source)))
        return np.sort(self._order[1][i * self.size : (i + 1) * self.size])

    def __call__(self, step: int) -> torch.Tensor:
        idx = self.indices(step)
        if self.tokens is not None:
            return torch.from_numpy(self.tokens[idx].astype(np.int64))
        rng = np.random.default_rng(step_seed(self.seed, step, 1))
        crops = data.random_resized_crop(self.pixels[idx], self.resolution, rng)
        return torch.from_numpy(self.palette.encode(crops).astype(np.int64))


class Prefetcher:
    """Builds the next steps' batches in a background thread so the model never waits for data."""

    def __init__(self, batches: Batches, start: int, stop: int, depth: int = 3):
        self.queue: Queue = Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._run, args=(batches, start, stop), daemon=True)
        self.thread.start()

    def _run(self, batches, start, stop):
        try:
            for step in range(start, stop):
                self.queue.put((step, batches(step)))
        except BaseException as err:  # surfaced in the training thread
            self.queue.put((None, err))

    def get(self) -> tuple[int, torch.Tensor]:
        step, item = self.queue.get()
        if step is None:
            raise item
        return step, item


# ---- loss ---------------------------------------------------------------------------------
def bert_mask(shape: tuple[int, int], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) < BERT_MASK_RATE


def nll_sum(model: torch.nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Summed next-pixel (AR) or masked-pixel (BERT) negative log-likelihood, in nats."""
    logits = model(tokens, mask=mask) if mask is not None else model(tokens)
    nll = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none")
    return nll.sum() if mask is None else (nll * mask.flatten()).sum()


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def bf16_native(device: torch.device) -> bool:
    """Whether bf16 matrix products run in hardware here; elsewhere PyTorch emulates them, far slower than fp32.

    CPUs need AVX-512 BF16 or AMX (an AVX2-only EPYC measured 0.3 GFLOP/s in bf16 against
    124 in fp32); CUDA devices need compute capability 8.0 or later.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return True


def precision_warning(device: torch.device, precision: str) -> str | None:
    """One line for users who ask for bf16 where it is emulated, or None."""
    if precision != "bf16" or bf16_native(device):
        return None
    missing = "AVX-512 BF16 or AMX" if device.type == "cpu" else "compute capability 8.0"
    return (f"warning: this {device.type.upper()} has no native bf16 (no {missing}), so bf16 runs emulated "
            "and far slower than fp32; use --precision fp32")


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

    BERT masks are drawn from a fixed seed per batch, so the number is reproducible.
    """
    world = world or World(device=next(model.parameters()).device)
    was_training = model.training
    model.eval()
    n = len(tokens) if max_batches is None else min(len(tokens), max_batches * batch_size)
    total = torch.zeros(2, dtype=torch.float64)
    for b, start in enumerate(range(world.rank * batch_size, n, batch_size * world.size)):
        batch = torch.from_numpy(tokens[start : min(start + batch_size, n)].astype(np.int64)).to(world.device)
        mask = bert_mask(tuple(batch.shape), step_seed(seed, b, world.rank)).to(world.device) if objective == "bert" else None
        with autocast(world.device, precision):
            loss = nll_sum(model, batch, mask)
        total += torch.tensor([float(loss), float(batch.numel() if mask is None else mask.sum())], dtype=torch.float64)
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


# ---- the run ---------------------------------------------------------------------------------
def resolve_palette(cfg: TrainConfig, log) -> Palette:
    if cfg.palette == "openai":
        return Palette.openai()
    if cfg.palette == "fit":
        pixels = data.load(cfg.data, "train", cfg.resolution, **_data_kwargs(cfg)).images
        return Palette.fit(pixels, clusters=cfg.clusters, seed=cfg.seed, log=log)
    return Palette.load(cfg.palette)


def _data_kwargs(cfg: TrainConfig) -> dict:
    return dict(data_dir=cfg.data_dir, crop=cfg.crop, skip_bad=cfg.skip_bad)


def _augment_source(cfg: TrainConfig) -> np.ndarray:
    """Pixels to crop from: the native size when uniform, else twice the input resolution."""
    try:
        native = data.load(cfg.data, "train", None, **_data_kwargs(cfg))
        if native.resolution >= cfg.resolution:
            return native.images
    except IgptError:
        pass
    return data.load(cfg.data, "train", 2 * cfg.resolution, **_data_kwargs(cfg)).images


class Trainer:
    """One pretraining run writing into a run folder; `run()` trains to the end."""

    def __init__(self, cfg: TrainConfig, out: str | Path, resume: bool = False, log=print, progress: bool = True):
        self.cfg, self.log, self.progress = cfg, log, progress
        self.world = init_world(cfg.device)
        ImageGPTConfig.from_preset(cfg.model, **cfg.overrides)  # a bad preset or override fails before any file
        self.folder = RunFolder(out)
        on_main(self.world, lambda: self.folder.prepare(resume=resume, config=cfg, differences=config_differences))
        try:
            self._setup(cfg, resume, log)
        except BaseException:
            if self.world.is_main:
                self.folder.discard_if_empty()
            raise

    def _setup(self, cfg: TrainConfig, resume: bool, log) -> None:
        torch.manual_seed(cfg.seed)
        kwargs = _data_kwargs(cfg)

        def first_palette_and_caches() -> Palette:
            palette = self.folder.palette() if resume else resolve_palette(cfg, log)
            for split in ("train", "val"):
                data.load_tokens(cfg.data, split, cfg.resolution, palette, **kwargs)
            return palette

        self.palette = on_main(self.world, first_palette_and_caches)
        train = data.load_tokens(cfg.data, "train", cfg.resolution, self.palette, **kwargs)
        self.val = data.load_tokens(cfg.data, "val", cfg.resolution, self.palette, **kwargs)
        self.train_tokens = train.tokens
        if cfg.augment:
            self.batches = Batches(cfg.batch_size, cfg.seed, pixels=_augment_source(cfg), palette=self.palette,
                                   resolution=cfg.resolution)
        else:
            self.batches = Batches(cfg.batch_size, cfg.seed, tokens=train.tokens)
        if cfg.steps is not None:
            self.total = cfg.steps
        else:
            self.total = max(1, math.ceil((cfg.epochs or 1.0) * len(train) / cfg.batch_size))
        self.warmup = cfg.warmup if cfg.warmup is not None else min(self.batches.per_epoch, self.total // 5)
        self.micro = cfg.batch_size // cfg.grad_accum
        if self.micro % self.world.size:
            raise IgptError(
                f"the micro-batch ({self.micro} = batch {cfg.batch_size} / accum {cfg.grad_accum}) must split "
                f"evenly over {self.world.size} processes"
            )
        self.model_config = ImageGPTConfig.from_preset(
            cfg.model,
            **{"vocab_size": self.palette.size, "n_ctx": cfg.resolution**2, "objective": cfg.objective, **cfg.overrides},
        )
        if self.model_config.vocab_size != self.palette.size or self.model_config.n_ctx != cfg.resolution**2:
            raise IgptError("vocab_size and n_ctx follow the palette and --resolution; do not override them")
        self.model = ImageGPT(self.model_config).to(self.world.device)
        self.engine = wrap(self.model, self.world, cfg.fsdp)  # before the optimizer: FSDP swaps in sharded parameters
        # Fused AdamW: one kernel for all parameters, ~7x faster than the per-tensor loop on CPUs
        # (a 2% share of a bf16 step). FSDP's sharded parameters keep the default implementation.
        self.optimizer = torch.optim.AdamW(self.engine.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                           fused=not cfg.fsdp)
        self.start, self.best_val = 0, math.inf
        if resume:
            state = self.folder.train_state()
            self.start, self.best_val = state["step"], state["best_val"]
            load_full_state(self.engine, self.optimizer, state["model"], state["optimizer"])
        self.step_fn = torch.compile(self.engine) if cfg.compile else self.engine
        self._stop = False

    # -- helpers
    def _save(self, step: int) -> None:
        model_state, optimizer_state = full_state(self.engine, self.optimizer)
        if self.world.is_main:
            self.folder.save(self.model, self.palette, self.cfg, model_state, optimizer_state, step, self.best_val)

    def _validate(self, step: int) -> float:
        loss, _ = evaluate(
            self.engine, self.val.tokens, objective=self.cfg.objective, batch_size=self.micro,
            precision=self.cfg.precision, world=self.world, max_batches=self.cfg.eval_batches,
        )
        if self.world.is_main:
            self.folder.log_metrics({"step": step, "val_loss": loss, "val_bits_per_pixel": loss / LN2})
        if loss < self.best_val:
            self.best_val = loss
            model_state, _ = full_state(self.engine, None)  # a collective under FSDP
            if self.world.is_main:
                self.folder.save_best(self.model, self.palette, model_state)
        return loss

    def _sample_grid(self, step: int) -> None:
        if not self.world.is_main or self.cfg.objective != "ar" or (self.cfg.fsdp and self.world.distributed):
            return
        from igpt.sample import sample, save_grid

        gen = torch.Generator(device=self.world.device).manual_seed(self.cfg.seed)
        with autocast(self.world.device, self.cfg.precision):
            tokens = sample(self.model, 16, generator=gen)
        images = self.palette.decode(tokens.cpu().numpy())
        save_grid(images, self.folder.path / "samples" / f"step_{step:07d}.png")

    def _on_sigint(self, *_):
        self._stop = True

    # -- the loop
    def run(self) -> dict:
        cfg, world = self.cfg, self.world
        self.folder.trim_metrics(self.start)
        if self.start >= self.total:
            self.log(f"run already complete at step {self.start}")
            return {"step": self.start, "best_val_loss": self.best_val}
        previous = signal.signal(signal.SIGINT, self._on_sigint) if threading.current_thread() is threading.main_thread() else None
        prefetch = Prefetcher(self.batches, self.start, self.total)
        bar = None
        if world.is_main and self.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.total, initial=self.start, desc="train", unit="step", dynamic_ncols=True)
        n_ctx = self.model_config.n_ctx
        loss_value = math.nan
        try:
            for step in range(self.start, self.total):
                t0 = time.perf_counter()
                _, batch = prefetch.get()
                lr = learning_rate(step, cfg.lr, self.warmup, self.total)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                masks = [None] * cfg.grad_accum
                if cfg.objective == "bert":
                    masks = [bert_mask((self.micro, n_ctx), step_seed(cfg.seed, step, j, 2)) for j in range(cfg.grad_accum)]
                count = sum(self.micro * n_ctx if m is None else max(1, int(m.sum())) for m in masks)
                total = torch.zeros((), dtype=torch.float64)
                share = self.micro // world.size
                rows = slice(world.rank * share, (world.rank + 1) * share)
                for j in range(cfg.grad_accum):
                    x = batch[j * self.micro : (j + 1) * self.micro][rows].to(world.device, non_blocking=True)
                    mask = masks[j][rows].to(world.device) if masks[j] is not None else None
                    with no_sync(self.engine, j < cfg.grad_accum - 1), autocast(world.device, cfg.precision):
                        summed = nll_sum(self.step_fn, x, mask)
                        (summed * (world.size / count)).backward()
                    total += summed.detach().double().cpu()
                loss_value = float(all_sum(total.to(world.device), world)) / count
                if not math.isfinite(loss_value):
                    raise IgptError(
                        f"the loss became non-finite at step {step + 1}; the last good checkpoint "
                        f"(step {self.folder.saved_step()}) is kept: lower --lr or use --precision fp32"
                    )
                torch.nn.utils.clip_grad_norm_(self.engine.parameters(), cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                done = step + 1
                elapsed = time.perf_counter() - t0
                tokens_per_s = cfg.batch_size * n_ctx / elapsed
                if world.is_main:
                    self.folder.log_metrics({"step": done, "loss": loss_value, "lr": lr, "tokens_per_s": tokens_per_s})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                last = done == self.total
                if done % cfg.eval_every == 0 or last:
                    val = self._validate(done)
                    if bar is not None:
                        bar.write(f"step {done}: val {val:.4f} nats/token, {val / LN2:.3f} bits/pixel")
                if done % cfg.sample_every == 0 or last:
                    self._sample_grid(done)
                stop = self._stop_requested()
                if done % cfg.save_every == 0 or last or stop:
                    self._save(done)
                if stop:
                    self.log(f"interrupted: checkpoint saved at step {done}; continue with --resume")
                    break
        finally:
            if bar is not None:
                bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return {"step": done, "loss": loss_value, "best_val_loss": self.best_val}

    def _stop_requested(self) -> bool:
        flag = torch.tensor(float(self._stop))
        return bool(all_sum(flag.to(self.world.device), self.world) > 0)


def evaluate_split(model: ImageGPT, palette: Palette, spec: str, split: str = "test", *, batch_size: int = 64,
                   precision: str = "fp32", **data_kwargs) -> dict:
    """Exact loss of `model` on a whole split, with the uniform and unigram (palette-frequency) baselines."""
    resolution = math.isqrt(model.config.n_ctx)
    tokens = data.load_tokens(spec, split, resolution, palette, **data_kwargs)
    nats, n_tokens = evaluate(model, tokens.tokens, objective=model.config.objective, batch_size=batch_size,
                              precision=precision)
    train = data.load_tokens(spec, "train", resolution, palette, **data_kwargs)
    unigram = unigram_nats(train.tokens, tokens.tokens, palette.size)
    return {
        "nats_per_token": nats, "bits_per_pixel": nats / LN2, "n_images": len(tokens), "n_tokens": n_tokens,
        "objective": model.config.objective, "split": split,
        "baselines": {"uniform_bits_per_pixel": math.log2(palette.size), "unigram_bits_per_pixel": unigram / LN2},
    }


def run_data(run: dict, data_spec: str | None = None, data_dir: str | None = None, crop: bool = False,
             skip_bad: bool = False) -> tuple[str, dict]:
    """The data set a later command reads (default: the run's own) and the options that reproduce its splits.

    Held-out splits always use the data's own fixed seed, never the run's, so every command
    (and every run) sees the same train/val/test partition.
    """
    train_cfg = run.get("train", {})
    spec = data_spec or run.get("data") or train_cfg.get("data")
    if spec is None:
        raise IgptError("this checkpoint does not record its data set: pass --data")
    return spec, dict(data_dir=data_dir or train_cfg.get("data_dir"), crop=crop or train_cfg.get("crop", False),
                      skip_bad=skip_bad)


def load_run(path: str | Path, device: str | None = None) -> tuple[ImageGPT, Palette, dict]:
    """A trained (or imported) model, its palette and its run configuration, from a run folder."""
    folder = RunFolder(path)
    model = ImageGPT.from_pretrained(folder.path)
    side = math.isqrt(model.config.n_ctx)
    if side * side != model.config.n_ctx:
        raise IgptError(f"{folder.path}: the context of {model.config.n_ctx} pixels is not a square image; "
                        "the image commands need n_ctx = resolution squared")
    palette = folder.palette()
    if palette.size != model.config.vocab_size:
        raise IgptError(
            f"{folder.path}: the palette has {palette.size} colours but the model's vocabulary is "
            f"{model.config.vocab_size}; the folder mixes files from different runs"
        )
    run = json.loads((folder.path / "run.json").read_text()) if (folder.path / "run.json").is_file() else {}
    from igpt.distributed import resolve_device

    return model.to(resolve_device(device)), palette, run
