"""A/B of whole training steps: another version of igpt's model.py against this one, in one process, in turns.

    git show HEAD~1:src/igpt/model.py > /tmp/model_before.py
    python bench/ab_model.py /tmp/model_before.py [--attention local] [--side 64] [--batch 1] [--rounds 16] [--compile]
    python bench/ab_model.py /tmp/model_before.py --layer [--rounds 40]    # one band layer's attention alone

For changes inside the model (a kernel, a layout, a backward): both versions build the same
configuration (`tiny`, 2-D positions, window_rows 2, the same seed and weights) and step with
igpt.train.train_step on the same batch, alternating which goes first each round, so the VM's
drift and the previous step's cache state fall on both alike. Separate processes (as
bench_attention.py runs them) add their own noise between runs of the same code; this one
isolates the model file. Prints each version's best and median step and the ratio of the medians.
`--layer` times one band layer's attention instead (forward and backward of `band_attention`,
the other file's against igpt.attention's, with `tiny`'s heads, q, k and v as the model makes
them: views of one q/k/v product).
The other file must import only what this checkout's igpt provides.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from common import band_kernel_state, machine, times_in_turns
from igpt import attention
from igpt import model as this_model
from igpt.batches import Batch
from igpt.distributed import World
from igpt.train import make_optimizer, train_step


def load(path: str):
    spec = importlib.util.spec_from_file_location("igpt_model_other", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", help="the other version's model.py")
    parser.add_argument("--attention", default="local", choices=["dense", "local", "strided"])
    parser.add_argument("--side", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--layer", action="store_true", help="one band layer's attention, not whole steps")
    args = parser.parse_args()
    if args.layer and args.compile:
        parser.error("--layer times the eager attention only")
    other = load(args.other)
    step = band_layers(other, args) if args.layer else training_steps(other, args)
    times = times_in_turns(step, args.rounds, alternate=True)
    what = "one band layer (window_rows 2)" if args.layer else args.attention
    print(f"band attention: {band_kernel_state()}")
    print(f"{machine()}; {what} at {args.side}x{args.side}, batch {args.batch}, "
          f"{'compiled' if args.compile else 'eager'}, {args.rounds} rounds")
    median = {}
    for name, seconds in times.items():
        seconds.sort()
        median[name] = seconds[len(seconds) // 2]
        print(f"  {name:6s} best {seconds[0] * 1e3:7.2f} ms  median {median[name] * 1e3:7.2f} ms")
    print(f"  this version runs {median['other'] / median['this']:.3f}x the other's speed (medians)")


def training_steps(other, args) -> dict:
    """Each version's whole training step on one batch, warmed up."""
    world = World(device=torch.device("cpu"))
    steppers = {}
    for name, module in (("other", other), ("this", this_model)):
        torch.manual_seed(0)
        config = module.ImageGPTConfig.from_preset("tiny", vocab_size=512, n_ctx=args.side**2, positions="2d",
                                                   attention=args.attention, window_rows=2)
        model = module.ImageGPT(config)
        optimizer = make_optimizer(model.parameters(), lr=1e-4)
        steppers[name] = (torch.compile(model) if args.compile else model, optimizer)
    batch = Batch(torch.randint(0, 512, (args.batch, args.side**2)))
    for model, optimizer in steppers.values():
        for _ in range(3):  # AdamW's state, compilation, the allocator's first sizes
            train_step(model, optimizer, batch, world=world)

    def stepper(model, optimizer):
        return lambda: train_step(model, optimizer, batch, world=world)

    return {name: stepper(*pair) for name, pair in steppers.items()}


def band_layers(other, args) -> dict:
    """Each version's band_attention, forward and backward, on the same q/k/v product, warmed up."""
    tiny = this_model.ImageGPTConfig.from_preset("tiny", n_ctx=args.side**2)
    heads, head_dim, t = tiny.n_head, tiny.n_embd // tiny.n_head, tiny.n_ctx
    torch.manual_seed(0)
    qkv = torch.randn(args.batch, t, 3 * heads * head_dim, requires_grad=True)
    grad = torch.randn(args.batch, heads, t, head_dim)

    def stepper(module):
        def step() -> None:
            qkv.grad = None
            q, k, v = (x.view(args.batch, t, heads, head_dim).transpose(1, 2) for x in qkv.split(heads * head_dim, -1))
            module.band_attention(q, k, v, 2 * args.side, args.side).backward(grad)

        step()
        step()
        return step

    return {"other": stepper(other), "this": stepper(attention)}


if __name__ == "__main__":
    main()
