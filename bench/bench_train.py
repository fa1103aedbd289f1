"""Training throughput of `igpt train`'s actual step (data loading included) against Hugging Face.

    python bench/bench_train.py [--data cifar10-path-or-name] [--resolution 16] [--model mini] [--batch 32] [--steps 12]
                                [--device cpu|cuda] [--compile] [--precisions fp32 bf16] [--json PATH]

igpt runs its real Trainer (prefetching batches from the tokenised cache, AdamW, clipping,
logging) and the rate is read from its metrics.jsonl; Hugging Face's ImageGPT runs igpt's own
training step (igpt.train.train_step) on the same batches. In fp32, and bf16 autocast where bf16 is native (or the
--precisions given); the ratio compares best with best, and igpt with Hugging Face in each
precision. Every rate is also a fraction of its own precision's matmul peak (model FLOPs
utilisation: a bf16 rate against the bf16 peak, an fp32 rate against the fp32 peak), both peaks
measured in the same run, best of three.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from common import (HuggingFaceAsIgpt, add_device_options, add_precisions_option, cifar10_or_digits, hf_model, machine,
                    matmul_peaks, model_train_flops_per_token, of_peak, peak_name, peaks_line, synchronize,
                    timed_precisions, write_training_json)
from igpt import Palette, data
from igpt.batches import Batches
from igpt.checkpoint import RunFolder
from igpt.data import DataConfig
from igpt.distributed import World
from igpt.model import ImageGPTConfig
from igpt.pretrain import PretrainConfig, Pretraining
from igpt.train import Trainer, make_optimizer, train_step


def igpt_rate(task: Pretraining, device: str | None) -> float:
    with tempfile.TemporaryDirectory() as out:
        Trainer(task, Path(out) / "run", log=lambda *_: None, progress=False).run()
        rates = [r["tokens_per_s"] for r in RunFolder(Path(out) / "run").metrics() if "tokens_per_s" in r]
    return statistics.median(rates[2:])


def hf_rate(config: ImageGPTConfig, tokens, batch_size: int, precision: str, steps: int, device: str,
            compiled: bool) -> float:
    """igpt's training step (igpt.train.train_step: AdamW, clipping, the loss read every step) around Hugging Face's model."""
    model = HuggingFaceAsIgpt(hf_model(config, device), config.vocab_size)
    optimizer = make_optimizer(model.parameters(), lr=1e-3)
    forward = torch.compile(model) if compiled else model
    batches = Batches(batch_size, 0, tokens)
    world = World(device=torch.device(device or "cpu"))
    rates = []
    for step in range(steps):
        start = time.perf_counter()
        batch = batches(step)
        train_step(forward, optimizer, batch, world=world, precision=precision)
        synchronize(world.device)
        rates.append(batch.tokens.numel() / (time.perf_counter() - start))
    return statistics.median(rates[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=None, help="default: CIFAR-10 from ../shared, else digits")
    parser.add_argument("--resolution", type=int, default=None, help="default: 16 for CIFAR-10, 8 for digits")
    parser.add_argument("--model", default="mini")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="steps per run; the first two are left out")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    add_precisions_option(parser)
    add_device_options(parser)
    args = parser.parse_args()
    data_spec = args.data or cifar10_or_digits()
    resolution = args.resolution or (8 if data_spec == "digits" else 16)
    print(f"machine: {machine(args.device)}")
    print(f"data {data_spec} at {resolution}x{resolution}, model {args.model}, batch {args.batch}")
    palette_file = Path(tempfile.mkdtemp()) / "palette.npy"
    palette = Palette.fit(data.load(data_spec, "train", resolution).images, 512, max_pixels=200_000)
    palette.save(palette_file)
    modes = timed_precisions(args)
    results = {}
    for precision in modes:
        task = Pretraining(DataConfig(name=data_spec, resolution=resolution),
                           PretrainConfig(model=args.model, batch_size=args.batch, steps=args.steps,
                                          precision=precision, eval_every=10**6, save_every=10**6,
                                          sample_every=10**6, eval_batches=1, palette=str(palette_file),
                                          device=args.device, compile=args.compile))
        results["igpt", precision] = igpt_rate(task, args.device)
        print(f"  igpt train     {precision}: {results['igpt', precision]:10,.0f} tokens/s")
    config = ImageGPTConfig.from_preset(args.model, vocab_size=palette.size, n_ctx=resolution**2)
    tokens = data.load_tokens(data_spec, "train", resolution, palette).tokens
    for precision in modes:
        results["hf", precision] = hf_rate(config, tokens, args.batch, precision, args.steps, args.device,
                                           args.compile)
        print(f"  Hugging Face   {precision}: {results['hf', precision]:10,.0f} tokens/s")
    flops = model_train_flops_per_token(config)
    peaks = matmul_peaks(dict.fromkeys((*modes, peak_name(args.device))), args.device)  # best of three
    print(f"  {peaks_line(peaks)}; {flops / 1e6:.1f} MFLOP/token")
    for precision in modes:
        ours, theirs = results["igpt", precision], results["hf", precision]
        print(f"  {precision}: igpt {of_peak(ours, flops, peaks, precision):.1%} of the {precision} peak, "
              f"Hugging Face {of_peak(theirs, flops, peaks, precision):.1%}; igpt / Hugging Face {ours / theirs:.2f}x")
    best_precision = max(modes, key=lambda p: results["igpt", p])
    ours = results["igpt", best_precision]
    theirs = max(results["hf", p] for p in modes)
    print(f"  best igpt ({best_precision}) / best Hugging Face: {ours / theirs:.2f}x (goal >= 3x)")
    notes = (f"{best_precision}{' + compile' if args.compile else ''}; {args.model}, {resolution}x{resolution}, "
             f"batch {args.batch}")
    write_training_json(args.json, "bench_train", args.device, "igpt train step", config, ("igpt", best_precision),
                        ours / theirs, notes, results, peaks)

if __name__ == "__main__":
    main()
