"""Forward + backward throughput: igpt against Hugging Face's ImageGPT, same configuration.

    python bench/bench_model.py [--layers 8] [--width 256] [--heads 8] [--side 32] [--batch 8]

Each implementation runs in fp32, under bf16 autocast, and bf16 + torch.compile; the ratio
compares best against best. Also reports the machine's bf16 matmul peak and the fraction igpt's step reaches.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import autocast, machine, matmul_peak, seconds_per_call, train_flops_per_token
from igpt.model import ImageGPT, ImageGPTConfig


def igpt_step(config, batch, precision, compiled):
    model = ImageGPT(config)
    forward = torch.compile(model) if compiled else model
    tokens = torch.randint(0, config.vocab_size, (batch, config.n_ctx))

    def step():
        with autocast("cpu", precision):
            loss = F.cross_entropy(forward(tokens).float().flatten(0, 1), tokens.flatten())
        loss.backward()

    return step


def hf_step(config, batch, precision, compiled):
    import transformers

    hf_config = transformers.ImageGPTConfig(
        vocab_size=config.vocab_size + 1, n_positions=config.n_ctx, n_embd=config.n_embd, n_layer=config.n_layer,
        n_head=config.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    model = transformers.ImageGPTForCausalImageModeling(hf_config)
    model.train()
    forward = torch.compile(model) if compiled else model
    tokens = torch.randint(0, config.vocab_size, (batch, config.n_ctx))
    ids = torch.cat([torch.full((batch, 1), config.vocab_size), tokens[:, :-1]], 1)

    def step():
        with autocast("cpu", precision):
            logits = forward(input_ids=ids).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        loss.backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--side", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=512)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = ImageGPTConfig(vocab_size=args.vocab, n_ctx=args.side**2, n_embd=args.width, n_layer=args.layers,
                            n_head=args.heads)
    tokens = args.batch * config.n_ctx
    print(f"machine: {machine()}")
    print(f"config: {args.layers} layers, width {args.width}, {args.heads} heads, {args.side}x{args.side}, batch {args.batch}")
    results = {}
    modes = [("fp32", False), ("bf16", False), ("bf16", True)]
    for name, make in (("igpt", igpt_step), ("hugging face", hf_step)):
        for precision, compiled in modes:
            mode = precision + (" + compile" if compiled else "")
            t = seconds_per_call(make(config, args.batch, precision, compiled))
            results[name, mode] = tokens / t
            print(f"  {name:13s} {mode:15s}: {tokens / t:10,.0f} tokens/s  ({t * 1000:7.1f} ms/step)")
    ours = max(v for (n, _), v in results.items() if n == "igpt")
    theirs = max(v for (n, _), v in results.items() if n == "hugging face")
    print(f"  best igpt / best Hugging Face: {ours / theirs:.2f}x (goal >= 3x)")
    peak = matmul_peak()
    non_embedding = 12 * args.layers * args.width**2
    flops = train_flops_per_token(args.layers, args.width, config.n_ctx, non_embedding)
    print(f"  bf16 matmul peak: {peak / 1e12:.2f} TFLOP/s; igpt's best step: {ours * flops / 1e12:.2f} "
          f"TFLOP/s = {ours * flops / peak:.0%} of peak")


if __name__ == "__main__":
    main()
