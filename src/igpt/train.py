"""The training loop: one loop for pretraining and fine-tuning, around an untouched model.

What differs between the two is a `Task` (pretrain.py, finetune.py): where batches come from,
how the model is built, what a validation measures and what happens at the end. The loop
owns the rest: gradient accumulation, clipping, the learning-rate schedule, logging, the
validation schedule with best-model saving and early stopping, checkpoints (also on Ctrl-C),
the non-finite stop and DDP/FSDP under torchrun. `train_step` is the one place that steps
the network's optimizer.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from igpt.batches import Batch, Batches, Prefetcher, Stream, process_rows, seed_of
from igpt.checkpoint import RunFolder
from igpt.config import check, device_option, differences, option, seed_option
from igpt.data import DataConfig
from igpt.distributed import (World, all_sum, close_world, full_state, init_world, load_full_state, no_sync, on_main,
                               synchronize, wrap)
from igpt.errors import IgptError, one_of
from igpt.migrate import run_record
from igpt.model import ImageGPT, bert_mask, nll
from igpt.palette import Palette
from igpt.precision import PRECISIONS, autocast, precision_option, resolve_precision
from igpt.runrecord import RunInfo

SCHEDULES = ("cosine", "constant")
BUDGET_SHARE = 0.98  # of what --minutes leaves for the steps: a reserve for what timing them did not see


@dataclass
class TrainConfig:
    """The loop's settings, shared by pretraining and fine-tuning (whose configs change some defaults).

    Fields in RUNTIME_FIELDS may change on --resume; the others define the run. Given none of steps, epochs and
    minutes, the loop runs one epoch (`igpt train` gives it minutes from the data: igpt.pretrain.planned).
    """

    batch_size: int = option(64, "global batch per optimizer step")
    grad_accum: int = option(1, "micro-batches per step (same result, less memory)")
    lr: float | None = option(3e-3, "peak learning rate")
    schedule: str = option("cosine", "learning rate after the warm-up", choices=SCHEDULES)
    warmup: int | None = option(None, "warm-up steps (default: about one epoch, at most a fifth of the run)")
    steps: int | None = option(None, "optimizer steps (overrides --epochs)")
    epochs: float | None = option(None, "passes over the training images when --steps is not given")
    minutes: float | None = option(None, "wall-clock budget when --steps is not given: as many steps as the loop, "
                                         "timed, fits, and a stop at the deadline (overrides --epochs)")
    grad_clip: float = option(1.0, "clip the gradient norm to this")
    seed: int = seed_option("seed of every random stream (batches, crops, masks, initialisation)")
    precision: str = precision_option()
    device: str | None = device_option()
    compile: bool = option(False, "torch.compile the model")
    fsdp: bool = option(False, "shard with FSDP2 under torchrun (default: DDP)")
    eval_every: int | None = option(100, "steps between validations")
    eval_batches: int | None = option(None, "cap the validation batches")
    save_every: int | None = option(200, "steps between checkpoints")
    patience: int | None = option(None, "stop after this many validations without improvement")

    def __post_init__(self):
        positive = ("batch_size", "grad_accum", "steps", "epochs", "minutes", "eval_every", "eval_batches",
                    "save_every", "patience")
        check([(getattr(self, name) is None or getattr(self, name) > 0,
                f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}") for name in positive] + [
            (self.lr is None or (self.lr > 0 and math.isfinite(self.lr)), "--lr must be a positive number"),
            (self.warmup is None or self.warmup >= 0, "--warmup must be >= 0"),
            (self.grad_clip > 0, "--grad-clip must be positive"),
            (self.schedule in SCHEDULES, f"--schedule must be {one_of(SCHEDULES)}"),
            (self.precision in PRECISIONS, f"--precision must be {one_of(PRECISIONS)}, got {self.precision!r}"),
            (self.batch_size % self.grad_accum == 0, "--batch-size must be divisible by --grad-accum"),
        ])

    @property
    def micro_batch(self) -> int:
        """Images per forward pass: the batch over the accumulation steps (validation batches have this size too)."""
        return self.batch_size // self.grad_accum


def inherited(cls: type, name: str, default, help: str | None = None):
    """Field `name` of `cls` with another default (and help): a subclass's own default, written once."""
    metadata = dict(cls.__dataclass_fields__[name].metadata)
    if help is not None:
        metadata["help"] = help
    return dataclasses.field(default=default, metadata=metadata)


RUNTIME_FIELDS = {"device", "compile", "fsdp", "eval_every", "eval_batches", "save_every", "sample_every",
                  "skip_bad", "precision"}


def learning_rate(step: int, base: float, warmup: int, total: int, schedule: str = "cosine") -> float:
    """Linear warm-up from 0 over `warmup` steps, then constant or cosine decay to 0 at `total` (docs/reference.md §5)."""
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(parameters, lr: float, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW with the paper's betas and no weight decay (docs/reference.md §5).

    Fused: one kernel for all parameters, several times faster than the per-tensor loop on
    CPUs. FSDP's sharded parameters keep the default implementation.
    """
    return torch.optim.AdamW(parameters, lr=lr, betas=(0.9, 0.95), weight_decay=0.0, fused=fused)


class NonFiniteLoss(Exception):
    pass


def seconds(work: Callable[[], object], device: torch.device) -> float:
    """Wall-clock seconds of `work()`, the device's queued work finished before and after."""
    synchronize(device)
    start = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - start


def median_seconds(step: Callable[[int], object], device: torch.device, *, warm: int, timed: int) -> float:
    """Seconds a step takes: the median of `timed` calls step(i), one by one after `warm` untimed ones (a compiled
    model may compile again on its second call), so one slow step (a busy machine) does not decide it."""
    for i in range(warm):
        step(i)
    return statistics.median(seconds(lambda: step(i), device) for i in range(warm, warm + timed))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, *, world: World,
               grad_accum: int = 1, precision: str = "fp32", grad_clip: float = 1.0, gen_weight: float = 1.0,
               mask: torch.Tensor | None = None) -> dict[str, float]:
    """One optimizer step over a global batch: the loss is gen_weight * L_GEN (+ L_CLF with labels).

    Each process takes its share of each of `grad_accum` micro-batches. The losses are sums
    divided by the global batch's counts, so accumulation and processes add up to exactly the
    single-batch mean. `mask` (bert) covers the global batch. Raises NonFiniteLoss before
    the optimizer sees a non-finite gradient.
    """
    size, n_ctx = batch.shape
    counts = (float(mask.sum()) if mask is not None else float(size * n_ctx), float(size))
    sums = torch.zeros(2, dtype=torch.float64)
    for j, rows in enumerate(process_rows(size, grad_accum, world)):
        part = batch.rows(rows).to(world.device)
        part_mask = mask[rows].to(world.device) if mask is not None else None
        with no_sync(model, j < grad_accum - 1), autocast(world.device, precision):
            if part.labels is None:
                logits, clf = model(part.tokens, part_mask), torch.zeros((), device=world.device)
            else:
                logits, class_logits = model(part.tokens, part_mask, classes=True)
                clf = F.cross_entropy(class_logits.float(), part.labels, reduction="sum")
            gen = nll(logits, part.tokens, part_mask)[0] if gen_weight else torch.zeros((), device=world.device)
            loss = gen_weight * gen / max(1.0, counts[0]) + clf / counts[1]
            (loss * world.size).backward()  # DDP averages gradients over processes; the counts are global
        sums += torch.stack([gen.detach().double().cpu(), clf.detach().double().cpu()])
    gen_loss, clf_loss = (all_sum(sums.to(world.device), world).cpu() / torch.tensor(counts).clamp(min=1)).tolist()
    loss = gen_weight * gen_loss + clf_loss
    if not math.isfinite(loss):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    terms = {"loss": loss}
    if batch.labels is not None:
        terms["clf_loss"] = clf_loss
        if gen_weight:
            terms["gen_loss"] = gen_loss
    return terms


class Task:
    """What a kind of training plugs into the loop (see Pretraining and Finetuning).

    `prepare` runs once the run folder is locked and sets `palette`, `model` (on the CPU,
    unwrapped) and `batches`; the rest are hooks.
    """

    kind: str
    cfg: TrainConfig
    data: DataConfig
    palette: Palette
    model: ImageGPT
    batches: Batches
    score_name = "val_loss"  # what `validate` returns as its score
    higher_is_better = False
    gen_weight = 1.0

    def prepare(self, folder: RunFolder, resume: bool, world: World, log) -> None:
        raise NotImplementedError

    def record(self) -> dict:
        """What run.json says about the run besides its progress: kind, data, settings."""
        return {"kind": self.kind, "data": dataclasses.asdict(self.data), "config": dataclasses.asdict(self.cfg)}

    def differences(self, saved: dict, now: dict | None = None) -> list[str]:
        """How this command (`now`: its record, the task's unless given) differs from the saved run in what defines
        a run (empty: it may resume). `saved` is read as igpt.migrate brings it to today's layout."""
        saved = run_record(saved)
        if "written_by" in saved:
            return [f"the run folder was written by {saved['written_by']}, whose runs cannot resume here: "
                    "start a new run"]
        now = self.record() if now is None else now
        return [*differences(saved.get("data") or {}, now["data"], RUNTIME_FIELDS),
                *differences(saved.get("config") or {}, now["config"], RUNTIME_FIELDS),
                *differences(saved, {k: v for k, v in now.items() if k not in ("data", "config")})]

    def validate(self, model: torch.nn.Module, world: World) -> dict[str, float]:
        """Metrics to log; the one named `score_name` decides the best model and early stopping."""
        raise NotImplementedError

    def after_step(self, trainer: "Trainer", step: int, last: bool, folder: RunFolder) -> None:
        """Anything else to do after step `step` (sample grids, say), writing into `folder`."""

    def after_step_every(self) -> int | None:
        """Every how many steps `after_step` works (besides the last step), for --minutes' sizing; None: never."""
        return None

    def describe(self) -> str:
        """What is trained, for the line the loop prints before its first step (once `prepare` has run)."""
        c = self.model.config
        return f"{self.kind} at {c.side}x{c.side}, {c.vocab_size}-colour palette, {c.n_layer} layers, width {c.n_embd}"

    def finish(self, trainer: "Trainer", summary: dict) -> dict:
        """The run's result, once the loop has ended (not on an interruption)."""
        return summary


class Trainer:
    """One run of `task` in the run folder `out`; `run()` trains to the end (or to early stopping).

    `config` is the task's configuration with the run's step count: as given, as --minutes sized it, or, on
    --resume of a sized run, as it was sized. The task's own configuration stays as the caller made it.
    """

    def __init__(self, task: Task, out: str | Path, *, resume: bool = False, log=print, progress: bool = True):
        self.task, self.config, self.log, self.progress = task, task.cfg, log, progress
        self.started = time.perf_counter()  # --minutes counts from here (pretraining's palette fit and data are in it)
        self.folder = RunFolder(out)
        if resume and self._unsized:  # a sized run resumes with the step count it was given, to end where it would have
            self.config = dataclasses.replace(task.cfg, steps=RunInfo.read(self.folder.path).config.get("steps"))
        self.world = init_world(self.config.device)
        self.config = cfg = dataclasses.replace(self.config, precision=resolve_precision(self.config.precision,
                                                                                          self.world.device))
        on_main(self.world, lambda: self.folder.prepare(
            resume=resume, differences=lambda saved: task.differences(saved, self.record())))
        try:
            task.prepare(self.folder, resume, self.world, log)
            self.eval_every = cfg.eval_every or task.batches.per_epoch
            self._schedule(cfg.steps or max(1, math.ceil((cfg.epochs or 1.0) * len(task.batches.tokens) / cfg.batch_size)))
            self.save_every = cfg.save_every or self.eval_every
            if cfg.micro_batch % self.world.size:
                raise IgptError(f"the micro-batch ({cfg.micro_batch} = batch {cfg.batch_size} / accum "
                                f"{cfg.grad_accum}) must split evenly over {self.world.size} processes")
            task.batches.keep(process_rows(cfg.batch_size, cfg.grad_accum, self.world))  # read only this share
            self.model = task.model.to(self.world.device)
            self.engine = wrap(self.model, self.world, cfg.fsdp)  # before the optimizer: FSDP swaps in sharded parameters
            self.optimizer = self._new_optimizer()
            self.start, self.best, self.stale, self.finished = 0, None, 0, False
            if resume:
                state = self.folder.train_state()
                self.start, self.best = state["step"], state["best"]
                self.stale, self.finished = state.get("stale", 0), state.get("finished", False)
                load_full_state(self.engine, self.optimizer, state["model"], state["optimizer"])
            self.step_fn = torch.compile(self.engine) if cfg.compile else self.engine
            self.bert = self.model.config.objective == "bert" and task.gen_weight > 0
            self.cutoff = self.estimated_s = None
            if self._unsized and self.start == 0:
                self._fit_budget()
        except BaseException:
            if self.world.is_main:
                self.folder.discard_if_empty()
            self.close(finished=False)
            raise
        self._stop = False

    @property
    def _unsized(self) -> bool:
        """Whether --minutes is to size the run: no step count given, nor sized yet."""
        return self.config.minutes is not None and self.config.steps is None

    def record(self) -> dict:
        """What run.json says about the run besides its progress: the task's record with this run's step count."""
        record = self.task.record()
        record["config"]["steps"], record["config"]["precision"] = self.config.steps, self.config.precision
        return record

    def close(self, finished: bool = True) -> None:
        """Release the run folder (its lock and writers) and the process group."""
        if self.world.is_main:
            self.folder.close()
        close_world(self.world, finished)

    # -- pieces of the loop
    def _schedule(self, total: int) -> None:
        """The run's length and, from it, the default warm-up: about an epoch, at most a fifth of the run."""
        self.total = total
        per_epoch = self.task.batches.per_epoch
        self.warmup = self.config.warmup if self.config.warmup is not None else min(per_epoch, total // 5)

    def _optimizer_step(self, step: int, batch: Batch, lr: float) -> dict[str, float]:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mask = None
        if self.bert:
            mask = bert_mask(batch.shape, seed_of(self.config.seed, Stream.BERT_MASK, step))
        try:
            return train_step(self.step_fn, self.optimizer, batch, world=self.world, grad_accum=self.config.grad_accum,
                              precision=self.config.precision, grad_clip=self.config.grad_clip,
                              gen_weight=self.task.gen_weight, mask=mask)
        except NonFiniteLoss:
            raise IgptError(
                f"the loss became non-finite at step {step + 1}; the last good checkpoint "
                f"(step {self.folder.saved_step()}) is kept: lower --lr or use --precision fp32") from None

    def _fit_budget(self) -> None:
        """--minutes: time the loop's own steps (real batches, compiled if the run is), then size the run.

        Timing the loop itself rather than a model on random tokens counts what a separate benchmark misses (the
        data thread sharing the cores, the compiled graph the run uses). The timed steps run at learning rate 0
        with no weight decay, which leaves every weight as it was; a new optimizer replaces the timed one and the
        random state is forked, so the run is the one `--steps N` gives. A validation, a checkpoint and the task's
        after-step work (the sample grid) are timed too, the last two written into a scratch folder of their own.
        What is left of the budget after the palette, the data, compilation and this timing pays for N steps with
        their validations (each counted with a best-model save), checkpoints and sample grids, and for the end's;
        rank 0's figures decide for every rank, and `config` becomes a copy with N steps. Should the machine slow
        down, the loop begins no step that would leave the end's work past the deadline.
        """
        cfg, world, task = self.config, self.world, self.task
        warm, timed = (3 if cfg.compile else 1), 10
        with torch.random.fork_rng(devices=[world.device] if world.device.type == "cuda" else []):
            prefetch = Prefetcher(task.batches, 0, warm + timed)
            step_s = median_seconds(lambda step: self._optimizer_step(step, prefetch.get()[1], lr=0.0), world.device,
                                    warm=warm, timed=timed)
            validation = seconds(lambda: task.validate(self.engine, world), world.device)
            with tempfile.TemporaryDirectory() as tmp:
                scratch = RunFolder(tmp)
                checkpoint = seconds(lambda: self._save(0, scratch), world.device)
                extra = seconds(lambda: task.after_step(self, 0, True, scratch), world.device)
        every = task.after_step_every()
        per_step = (step_s + (validation + checkpoint) / self.eval_every + checkpoint / self.save_every
                    + (extra / every if every else 0))
        end = validation + 2 * checkpoint + extra
        deadline = self.started + cfg.minutes * 60
        left = deadline - time.perf_counter()
        steps = int(BUDGET_SHARE * (left - end) / per_step) if world.is_main else 0
        steps = int(all_sum(torch.tensor(steps, device=world.device), world))
        if steps < 1:
            raise IgptError(f"--minutes {cfg.minutes:g} is spent before the first step (the data, the palette and "
                            f"timing the step took {(time.perf_counter() - self.started) / 60:.1f} minutes): "
                            "give more minutes, or --steps")
        self.cutoff = deadline - step_s - end
        self.estimated_s = steps * per_step + end
        self.config = dataclasses.replace(cfg, steps=steps)
        self._schedule(steps)
        self.optimizer = self._new_optimizer()  # the timed one has moments (and saving gives any optimizer some)
        self.log(f"--minutes {cfg.minutes:g}: {step_s:.3f} s a step, {validation:.2f} s a validation, {checkpoint:.2f} s "
                 f"a checkpoint, {extra:.2f} s the after-step work: {steps} steps fit the {left / 60:.1f} minutes left")

    def plan_line(self) -> str:
        """One line before the first step: what is trained, its precision, steps and, when --minutes sized the run,
        the time they are expected to take."""
        cfg = self.config
        if self.estimated_s is None:
            time_text = "time not estimated (no budget in minutes to time)"
        elif self.estimated_s < 90:
            time_text = f"about {self.estimated_s:.0f} s"
        else:
            time_text = f"about {self.estimated_s / 60:.1f} minutes"
        steps = f"{self.total:,}" if self.start == 0 else f"{self.total - self.start:,} of {self.total:,}"
        return f"plan: {self.task.describe()}; {cfg.precision}; {steps} steps of batch {cfg.batch_size}, {time_text}"

    def _past_cutoff(self) -> bool:
        """Whether --minutes' last moment to begin a step has passed (on any rank, so that all stop together)."""
        if self.cutoff is None:
            return False
        late = torch.tensor(float(time.perf_counter() > self.cutoff), device=self.world.device)
        return bool(all_sum(late, self.world) > 0)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.engine.parameters(), self.config.lr, fused=not self.config.fsdp)

    def _improved(self, score: float) -> bool:
        if self.best is None:
            return True
        return score > self.best if self.task.higher_is_better else score < self.best

    def _save(self, step: int, folder: RunFolder) -> None:
        """A checkpoint at step `step`, into `folder` (the run's, or the scratch one --minutes times it in)."""
        model_state, optimizer_state = full_state(self.engine, self.optimizer)
        if self.world.is_main:
            state = {"step": step, "best": self.best, "stale": self.stale, "finished": self.finished,
                     "model": model_state, "optimizer": optimizer_state}
            run = {**self.record(), "step": step, f"best_{self.task.score_name}": self.best}
            folder.save(self.model, self.task.palette, run, state)

    def _validate(self, step: int) -> str:
        metrics = self.task.validate(self.engine, self.world)
        score = metrics[self.task.score_name]
        if self.world.is_main:
            self.folder.log_metrics({"step": step, **metrics})
        if self._improved(score):
            self.best, self.stale = score, 0
            model_state, _ = full_state(self.engine, None)  # a collective under FSDP
            if self.world.is_main:
                self.folder.save_best(self.model, self.task.palette, model_state)
        else:
            self.stale += 1
        return f"step {step}: " + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())

    def _on_sigint(self, *_):
        self._stop = True

    def _stop_requested(self) -> bool:
        flag = torch.tensor(float(self._stop))
        return bool(all_sum(flag.to(self.world.device), self.world) > 0)

    # -- the loop
    def run(self) -> dict:
        """Train from the last checkpoint to the end; returns the task's result. Releases the folder."""
        try:
            result = self._run()
        except BaseException:
            self.close(finished=False)
            raise
        self.close()
        return result

    def _run(self) -> dict:
        cfg, world, task = self.config, self.world, self.task
        self.folder.trim_metrics(self.start)
        if self.finished or self.start >= self.total:
            self.log(f"run already complete at step {self.start}")
            return {"step": self.start, f"best_{task.score_name}": self.best}
        if world.is_main:
            self.log(self.plan_line())
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._on_sigint) if main_thread else None
        prefetch = Prefetcher(task.batches, self.start, self.total)
        bar = None
        if world.is_main and self.progress:
            from igpt.progress import progress_bar

            bar = progress_bar(self.total, initial=self.start, desc=task.kind, unit="step")
        say = bar.write if bar is not None else self.log
        terms, done, interrupted = {}, self.start, False
        try:
            for step in range(self.start, self.total):
                t0 = time.perf_counter()
                _, batch = prefetch.get()
                lr = learning_rate(step, cfg.lr, self.warmup, self.total, cfg.schedule)
                terms = self._optimizer_step(step, batch, lr)
                done = step + 1
                tokens_per_s = math.prod(batch.shape) / (time.perf_counter() - t0)
                if world.is_main:
                    self.folder.log_metrics({"step": done, **terms, "lr": lr, "tokens_per_s": tokens_per_s})
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{terms['loss']:.4f}", tok_s=f"{tokens_per_s:,.0f}")
                last = done == self.total
                if not last and self._past_cutoff():
                    say(f"the {cfg.minutes:g}-minute budget is spent: the run ends at step {done} of {self.total}")
                    last = True
                if done % self.eval_every == 0 or last:
                    say(self._validate(done))
                    if cfg.patience is not None and self.stale >= cfg.patience and not last:
                        say(f"early stop: no better {task.score_name} for {self.stale} validations")
                        last = True
                task.after_step(self, done, last, self.folder)
                interrupted = self._stop_requested()
                self.finished = last
                if done % self.save_every == 0 or last or interrupted:
                    self._save(done, self.folder)
                if interrupted:
                    self.log(f"interrupted: checkpoint saved at step {done}; continue with --resume")
                    break
                if last:
                    break
        finally:
            if bar is not None:
                bar.close()
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        summary = {"step": done, "loss": terms.get("loss", math.nan), f"best_{task.score_name}": self.best}
        return summary if interrupted else task.finish(self, summary)

