"""Training throughput of `igpt train`'s actual step (data loading included) against Hugging Face.

    python bench/bench_train.py [--data cifar10-path-or-name] [--resolution 16] [--model mini] [--batch 32] [--steps 12]
                                [--device cpu|cuda] [--compile]

igpt runs its real Trainer (prefetching batches from the tokenised cache, AdamW, clipping,
logging) and the rate is read from its metrics.jsonl; Hugging Face's ImageGPT runs the same
loop on the same batches. In fp32, and bf16 autocast where bf16 is native; the ratio compares
best with best. On a GPU (--device cuda, with --compile) the model FLOPs utilisation is
reported against the measured bf16 matmul peak.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from common import autocast, machine, matmul_peak, peak_name, precisions, synchronize, train_flops_per_token
from igpt import Palette, data
from igpt.checkpoint import RunFolder
from igpt.train import Batches, TrainConfig, Trainer

CIFAR = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "cifar10" / "cifar10-jpeg.tar.gz"


def igpt_rate(cfg: TrainConfig) -> tuple[float, Trainer]:
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, Path(out) / "run", log=lambda *_: None, progress=False)
        trainer.run()
        rates = [r["tokens_per_s"] for r in RunFolder(Path(out) / "run").metrics() if "tokens_per_s" in r]
    return statistics.median(rates[2:]), trainer


def hf_rate(trainer: Trainer, precision: str, steps: int, device: str, compiled: bool) -> float:
    import transformers

    c = trainer.model_config
    hf = transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(
        vocab_size=c.vocab_size + 1, n_positions=c.n_ctx, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).to(device).train()
    optimizer = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0, fused=True)
    forward = torch.compile(hf) if compiled else hf
    batches = Batches(trainer.cfg.batch_size, 0, tokens=trainer.train_tokens)
    rates = []
    for step in range(steps):
        start = time.perf_counter()
        tokens = batches(step).to(device)
        ids = torch.cat([torch.full((len(tokens), 1), c.vocab_size, device=device), tokens[:, :-1]], 1)
        with autocast(tokens.device.type, precision):
            logits = forward(input_ids=ids).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()  # igpt's loop reads its loss every step too
        synchronize(device)
        rates.append(tokens.numel() / (time.perf_counter() - start))
    return statistics.median(rates[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(CIFAR) if CIFAR.exists() else "digits")
    parser.add_argument("--resolution", type=int, default=16 if CIFAR.exists() else 8)
    parser.add_argument("--model", default="mini")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--device", default="cpu", help="cpu | cuda")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    args = parser.parse_args()
    print(f"machine: {machine(args.device)}")
    print(f"data {args.data} at {args.resolution}x{args.resolution}, model {args.model}, batch {args.batch}")
    results, trainer = {}, None
    palette_file = Path(tempfile.mkdtemp()) / "palette.npy"
    Palette.fit(data.load(args.data, "train", args.resolution).images, 512, max_pixels=200_000).save(palette_file)
    modes = precisions(args.device)
    for precision in modes:
        cfg = TrainConfig(data=args.data, resolution=args.resolution, model=args.model, batch_size=args.batch,
                          steps=args.steps, precision=precision, eval_every=10**6, save_every=10**6,
                          sample_every=10**6, eval_batches=1, palette=str(palette_file), device=args.device,
                          compile=args.compile)
        results["igpt", precision], trainer = igpt_rate(cfg)
        print(f"  igpt train     {precision}: {results['igpt', precision]:10,.0f} tokens/s")
    for precision in modes:
        results["hf", precision] = hf_rate(trainer, precision, args.steps, args.device, args.compile)
        print(f"  Hugging Face   {precision}: {results['hf', precision]:10,.0f} tokens/s")
    ours = max(results["igpt", p] for p in modes)
    theirs = max(results["hf", p] for p in modes)
    print(f"  best igpt / best Hugging Face: {ours / theirs:.2f}x (goal >= 3x)")
    c = trainer.model_config
    flops = train_flops_per_token(c.n_layer, c.n_embd, c.n_ctx, 12 * c.n_layer * c.n_embd**2)
    peak = matmul_peak(device=args.device)
    print(f"  {peak_name(args.device)} matmul peak {peak / 1e12:.2f} TFLOP/s; igpt's best training "
          f"step reaches {ours * flops / peak:.0%} of it")


if __name__ == "__main__":
    main()
