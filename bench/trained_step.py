"""A training step on a trained run's weights against the same step on freshly initialised ones.

    python bench/trained_step.py RUN [--steps 10] [--rounds 3] [--profile]

Speed benchmarks start from fresh weights; a trained model's can run differently (sharp attention
puts probabilities and their gradients under float's normal range, where arithmetic and exp leave
their fast paths: README, Speed, "Sharp attention"). This times the run's own eager training step
(igpt.train.train_step, learning rate 0, so no weight moves) on the same batches of its training
data for both, in turns, and prints the ratio (fresh is the reference) and each one's model FLOPs
rate against the fp32 matmul peak measured in the same run. With --profile, the operators whose
time differs most between the two. Last, the drift within the run itself: the median step per
500 steps from its metrics.jsonl, as logged while it trained.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from common import machine, matmul_peak, pattern_train_flops_per_token, times_in_turns
from igpt.batches import Batches
from igpt.checkpoint import RunFolder, load_run
from igpt.distributed import World
from igpt.model import ImageGPT
from igpt.train import make_optimizer, train_step


def operator_ms(step, steps: int) -> dict[str, float]:
    """Self CPU milliseconds a step of each operator, over `steps` steps."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    return {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()}


def logged_drift(run: Path, tokens_per_step: int) -> str:
    seconds = [(r["step"], tokens_per_step / r["tokens_per_s"])
               for r in RunFolder(run).metrics() if r.get("tokens_per_s")]
    parts = []
    for start in range(0, len(seconds), 500):
        chunk = seconds[start:start + 500]
        parts.append(f"{chunk[0][0]}-{chunk[-1][0]} {statistics.median(s for _, s in chunk):.3f}")
    return "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run folder of igpt train")
    parser.add_argument("--steps", type=int, default=10, help="steps a timing (default: 10)")
    parser.add_argument("--rounds", type=int, default=3, help="timings of each, in turns (default: 3)")
    parser.add_argument("--profile", action="store_true", help="also list the operators that differ most")
    args = parser.parse_args()

    trained, palette, info = load_run(args.run)
    config = trained.config
    tokens = info.data_for(config).tokens("train", palette).tokens
    batch = info.config["batch_size"]
    batches = Batches(batch, 0, tokens)
    torch.manual_seed(0)
    models = {"fresh weights (reference)": ImageGPT(config), "the run's trained weights": trained}
    world = World()
    peak = matmul_peak(torch.float32)

    def stepper(model):
        model.train()
        optimizer = make_optimizer(model.parameters(), lr=0.0)
        count = itertools.count()

        def step():
            train_step(model, optimizer, batches(next(count)), world=world)
        for _ in range(2):  # warm-up: the optimizer's state, the allocator
            step()
        return step

    steps = {name: stepper(model) for name, model in models.items()}
    runs = {name: (lambda step=step: [step() for _ in range(args.steps)]) for name, step in steps.items()}
    times = {name: min(t) / args.steps for name, t in times_in_turns(runs, args.rounds, alternate=True).items()}
    flops = pattern_train_flops_per_token(config) * batch * config.n_ctx
    print(f"{machine()}, fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; {args.run}: {config.n_layer} layers of "
          f"{config.n_embd}, {config.attention} attention, batch {batch}; eager step at learning rate 0, best of "
          f"{args.rounds} timings of {args.steps} steps, in turns")
    reference = times["fresh weights (reference)"]
    for name, seconds in times.items():
        print(f"  {name:28s} {seconds * 1e3:8.1f} ms a step  {seconds / reference:5.2f}x the fresh step  "
              f"{flops / seconds / peak:6.1%} of the matmul peak")
    if args.profile:
        ops = {name: operator_ms(step, args.steps) for name, step in steps.items()}
        fresh, ours = ops.values()
        keys = sorted(set(fresh) | set(ours), key=lambda k: -abs(ours.get(k, 0) - fresh.get(k, 0)))
        print("  operators that differ most (self CPU ms a step, fresh -> trained):")
        for key in keys[:8]:
            print(f"    {key[:50]:50s} {fresh.get(key, 0):8.2f} -> {ours.get(key, 0):8.2f}")
    print(f"  the run's own steps as it trained, median seconds per 500: "
          f"{logged_drift(args.run, batch * config.n_ctx)}")


if __name__ == "__main__":
    main()
