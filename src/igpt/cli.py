"""The `igpt` command: a thin layer of argument parsing over the library.

Each subcommand is a `_cmd_*` function taking the parsed arguments; user errors are
`IgptError`s, printed by `main` as one line with a non-zero exit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from igpt.errors import IgptError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_data_args(p: argparse.ArgumentParser, default: str | None = "digits") -> None:
    p.add_argument(
        "--data",
        default=default,
        help="digits | mnist | fashion-mnist | cifar10 | cifar100 | an image folder, "
        ".tar/.tar.gz/.zip of one, or a .npz (default: %(default)s)",
    )
    p.add_argument("--data-dir", default=None, help="folder holding existing copies of a named data set")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) corrupt images instead of stopping")
    p.add_argument("--crop", action="store_true", help="centre-crop images to square before resizing")


def _cmd_palette_fit(args: argparse.Namespace) -> None:
    from igpt import data
    from igpt.palette import Palette

    train = data.load(
        args.data, "train", args.resolution, data_dir=args.data_dir, crop=args.crop, skip_bad=args.skip_bad
    )
    palette = Palette.fit(
        train.images, clusters=args.clusters, max_pixels=args.max_pixels, seed=args.seed, device=args.device, log=print
    )
    palette.save(args.out)
    print(f"wrote {args.out}: {palette.size} colours fitted on {train.describe()}")


def _train_config(args: argparse.Namespace):
    from igpt.train import TrainConfig

    overrides = {name: getattr(args, name) for name in ("n_layer", "n_embd", "n_head") if getattr(args, name) is not None}
    return TrainConfig(
        data=args.data, data_dir=args.data_dir, resolution=args.resolution, crop=args.crop, augment=args.augment,
        palette=args.palette, clusters=args.clusters, model=args.model, overrides=overrides, objective=args.objective,
        batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup, steps=args.steps,
        epochs=args.epochs, seed=args.seed, precision=args.precision, device=args.device, compile=args.compile,
        fsdp=args.fsdp, skip_bad=args.skip_bad, eval_every=args.eval_every, save_every=args.save_every,
        sample_every=args.sample_every, eval_batches=args.eval_batches,
    )


def _cmd_train(args: argparse.Namespace) -> None:
    from igpt.distributed import close_world
    from igpt.train import Trainer

    trainer = Trainer(_train_config(args), args.out, resume=args.resume)
    try:
        result = trainer.run()
    finally:
        close_world(trainer.world)
    if trainer.world.is_main:
        print(f"done: step {result['step']}, best validation loss {result['best_val_loss']:.4f} nats/token; run folder {args.out}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from igpt.train import evaluate_split, load_run, run_data

    model, palette, run = load_run(args.ckpt, args.device)
    data_name, kwargs = run_data(run, args.data, args.data_dir, args.crop, args.skip_bad)
    result = evaluate_split(model, palette, data_name, args.split, batch_size=args.batch_size,
                            precision=args.precision, **kwargs)
    base = result["baselines"]
    print(f"{data_name} {args.split}: {result['nats_per_token']:.4f} nats/token = {result['bits_per_pixel']:.4f} "
          f"bits/pixel over {result['n_images']:,} images (uniform {base['uniform_bits_per_pixel']:.3f}, "
          f"unigram {base['unigram_bits_per_pixel']:.3f} bits/pixel)")
    if args.json:
        from igpt.fileio import atomic_write_json

        atomic_write_json(args.json, result)


def _sampling_options(args: argparse.Namespace) -> dict:
    import torch

    from igpt.distributed import resolve_device
    from igpt.sample import filter_logits

    filter_logits(torch.zeros(1, 2), args.temperature, args.top_k, args.top_p)  # bad options fail first
    generator = torch.Generator(device=resolve_device(args.device)).manual_seed(args.seed)
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                batch_size=args.batch_size, compile=args.compile)


def _load_for_sampling(args: argparse.Namespace):
    from igpt.train import load_run

    model, palette, run = load_run(args.ckpt, args.device)
    if model.config.objective != "ar":
        raise IgptError(f"{args.ckpt} holds a bert-objective model: sampling needs an ar model")
    return model, palette, run


def _cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np

    from igpt.fileio import atomic_write
    from igpt.sample import sample, save_grid
    from igpt.train import autocast

    options = _sampling_options(args)  # validates before the model loads
    model, palette, _ = _load_for_sampling(args)
    device = next(model.parameters()).device
    with autocast(device, args.precision):
        tokens = sample(model, args.n, **options)
    images = palette.decode(tokens.cpu().numpy())
    out = Path(args.out)
    save_grid(images, out)
    atomic_write(out.with_suffix(".npy"), lambda f: np.save(f, images))
    print(f"wrote {out} and {out.with_suffix('.npy')}: {args.n} samples")


def _cmd_complete(args: argparse.Namespace) -> None:
    import math

    import numpy as np

    from igpt import data
    from igpt.fileio import atomic_write
    from igpt.sample import completion_rows, save_grid
    from igpt.train import autocast

    options = _sampling_options(args)
    model, palette, run = _load_for_sampling(args)
    side = math.isqrt(model.config.n_ctx)
    keep_rows = args.keep_rows if args.keep_rows is not None else round(args.keep * side)
    if args.keep_rows is None and not 0 <= args.keep <= 1:
        raise IgptError(f"--keep must lie in [0, 1], got {args.keep}")
    train_cfg = run.get("train", {})
    images = data.load(args.data or train_cfg.get("data", "digits"), args.split, side,
                       data_dir=args.data_dir or train_cfg.get("data_dir"), crop=args.crop, skip_bad=args.skip_bad)
    with autocast(next(model.parameters()).device, args.precision):
        rows = completion_rows(model, palette, np.asarray(images.images[: args.n]), keep_rows, args.samples, **options)
    out = Path(args.out)
    save_grid(rows.reshape(-1, side, side, 3), out, columns=args.samples + 2)
    atomic_write(out.with_suffix(".npy"), lambda f: np.save(f, rows))
    print(f"wrote {out}: {len(rows)} images x {args.samples} completions from the top {keep_rows} of {side} rows")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="run folder (or a converted model folder)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=None, help="images sampled at once")
    p.add_argument("--device", default=None)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (CUDA graphs on GPUs; on CPUs the eager step is faster)")
    p.add_argument("--out", required=True, help="output PNG (an .npy of the images is written beside it)")


def _empty_output(path: str) -> None:
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IgptError(f"--out {out} exists and is not an empty folder: choose a new one")


def _cmd_convert(args: argparse.Namespace) -> None:
    from igpt import hf
    from igpt.checkpoint import RunFolder
    from igpt.palette import Palette

    _empty_output(args.out)
    if args.from_hf:
        model, palette = hf.from_hf(args.from_hf)
        palette = Palette.load(args.palette) if args.palette else palette
        if palette is None:
            raise IgptError(f"{args.from_hf} has no preprocessor_config.json with the palette: pass --palette PATH")
        if palette.size != model.config.vocab_size:
            raise IgptError(f"the palette has {palette.size} colours but the model predicts {model.config.vocab_size}")
        RunFolder.save_model(Path(args.out), model, palette, None)
        print(f"wrote {args.out}: {model.config.n_layer} layers, width {model.config.n_embd}, {palette.size} colours")
    else:
        from igpt.train import load_run

        model, palette, _ = load_run(args.to_hf, "cpu")
        hf.to_hf(model, palette, args.out)
        print(f"wrote {args.out}: loads with transformers.ImageGPTForCausalImageModeling.from_pretrained")


def _cmd_probe(args: argparse.Namespace) -> None:
    import math

    from igpt import plots
    from igpt.fileio import atomic_write_json
    from igpt.finetune import labelled_splits
    from igpt.probe import Split, linear_probe, parse_layers, summary
    from igpt.train import load_run, run_data

    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise IgptError(f"--out {out} must name a .json file (probe.png is written beside it)")
    model, palette, run = load_run(args.ckpt, args.device)
    layers = parse_layers(args.layers, model.config.n_layer)  # a bad --layers fails before any data work
    data_name, kwargs = run_data(run, args.data, args.data_dir, args.crop, args.skip_bad)
    tokensets = labelled_splits(data_name, math.isqrt(model.config.n_ctx), palette, **kwargs)
    splits = {name: Split.of(s, args.max_train if name == "train" else None, args.seed) for name, s in tokensets.items()}
    classes = tokensets["train"].classes
    report = linear_probe(model, splits, n_classes=len(classes), layers=layers, batch_size=args.batch_size,
                          precision=args.precision, baselines=not args.no_baselines, seed=args.seed,
                          progress=True)
    report.update(ckpt=str(args.ckpt), data=data_name, classes=list(classes), objective=model.config.objective)
    atomic_write_json(out, report)
    plots.probe_accuracy(report, out.with_suffix(".png"))
    print(summary(report))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from igpt.finetune import FinetuneConfig, Finetuner

    cfg = FinetuneConfig(
        ckpt=args.ckpt, data=args.data, data_dir=args.data_dir, crop=args.crop, skip_bad=args.skip_bad,
        gen_weight=args.gen_weight, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, patience=args.patience,
        eval_every=args.eval_every, augment=not args.no_augment, flip=not args.no_flip, from_scratch=args.from_scratch, seed=args.seed,
        precision=args.precision, device=args.device,
    )
    Finetuner(cfg, args.out).run()


def _cmd_classify(args: argparse.Namespace) -> None:
    import math

    import numpy as np

    from igpt.data.images import decode, fit_to
    from igpt.finetune import load_classifier, predict

    model, palette, classes = load_classifier(args.ckpt, args.device)
    side = math.isqrt(model.config.n_ctx)
    images = np.stack([fit_to(decode(Path(path), str(path)), side, args.crop) for path in args.images])
    probs = predict(model, palette.encode(images))
    for path, p in zip(args.images, probs):
        k = int(p.argmax())
        name = classes[k] if classes and k < len(classes) else str(k)
        print(f"{path}\t{name}\t{p[k]:.3f}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from igpt.demo import run_demo

    run_demo(args.data, args.out, budget_minutes=args.budget_minutes, steps=args.steps, device=args.device,
             seed=args.seed, data_dir=args.data_dir)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag costs one line (problem and where to look), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="igpt", description="Image GPT: generative pretraining from pixels.")
    parser.add_argument("--version", action="version", version=f"igpt {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="the whole pipeline on a data set in a few minutes, with a report")
    demo.add_argument("--data", default="digits", help="digits (built in), mnist, fashion-mnist, cifar10, cifar100, "
                      "or a folder/archive/.npz of images (default: %(default)s)")
    demo.add_argument("--data-dir", default=None, help="folder holding existing copies of a named data set")
    demo.add_argument("--out", default=None, help="output folder (default: a new igpt-demo-<data> folder)")
    demo.add_argument("--budget-minutes", type=float, default=None,
                      help="wall-time target (default: 5 for digits, 20 otherwise)")
    demo.add_argument("--steps", type=_positive_int, default=None, help="train exactly this many steps instead")
    demo.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_demo)

    palette = sub.add_parser("palette", help="fit or inspect a colour palette")
    palette_sub = palette.add_subparsers(dest="palette_command", metavar="ACTION")
    fit = palette_sub.add_parser("fit", help="k-means colour palette over a data set's training pixels")
    _add_data_args(fit)
    fit.add_argument("--clusters", type=_positive_int, default=512, help="palette size K (default: %(default)s)")
    fit.add_argument("--resolution", type=_positive_int, default=32, help="input resolution (default: %(default)s)")
    fit.add_argument("--out", required=True, help="output .npy (or preprocessor_config.json for Hugging Face)")
    fit.add_argument("--max-pixels", type=_positive_int, default=2_000_000, help="pixels sampled (default: %(default)s)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    fit.set_defaults(func=_cmd_palette_fit)

    train = sub.add_parser("train", help="pretrain a model (AR or BERT objective) into a run folder")
    _add_data_args(train)
    train.add_argument("--resolution", type=_positive_int, default=8, help="input resolution (default: %(default)s)")
    train.add_argument("--palette", default="fit", help="fit | openai | PATH to a palette (default: %(default)s)")
    train.add_argument("--clusters", type=_positive_int, default=512, help="palette size when fitting")
    train.add_argument("--model", default="tiny", help="preset: tiny, mini, igpt-s, igpt-m, igpt-l, igpt-xl")
    train.add_argument("--n-layer", type=_positive_int, default=None, help="override the preset's depth")
    train.add_argument("--n-embd", type=_positive_int, default=None, help="override the preset's width")
    train.add_argument("--n-head", type=_positive_int, default=None, help="override the preset's head count")
    train.add_argument("--objective", choices=("ar", "bert"), default="ar")
    train.add_argument("--batch-size", type=_positive_int, default=64, help="global batch per optimizer step")
    train.add_argument("--grad-accum", type=_positive_int, default=1, help="micro-batches per step")
    train.add_argument("--lr", type=float, default=3e-3)
    train.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: about one epoch)")
    length = train.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_positive_int, default=None)
    length.add_argument("--epochs", type=float, default=None)
    train.add_argument("--out", required=True, help="run folder")
    train.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    train.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    train.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument("--fsdp", action="store_true", help="shard with FSDP2 under torchrun")
    train.add_argument("--augment", action="store_true", help="random resized crops")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--eval-every", type=_positive_int, default=100)
    train.add_argument("--eval-batches", type=_positive_int, default=None, help="cap validation batches")
    train.add_argument("--save-every", type=_positive_int, default=200)
    train.add_argument("--sample-every", type=_positive_int, default=500)
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("eval", help="exact loss (nats/token, bits/pixel) of a checkpoint on a split")
    evaluate.add_argument("--ckpt", required=True, help="run folder")
    _add_data_args(evaluate, default=None)
    evaluate.add_argument("--split", choices=("train", "val", "test"), default="test")
    evaluate.add_argument("--batch-size", type=_positive_int, default=64)
    evaluate.add_argument("--device", default=None)
    evaluate.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    evaluate.add_argument("--json", nargs="?", const="eval.json", default=None, help="also write the result as JSON")
    evaluate.set_defaults(func=_cmd_eval)

    convert = sub.add_parser("convert", help="import Hugging Face ImageGPT weights, or export to them")
    direction = convert.add_mutually_exclusive_group(required=True)
    direction.add_argument("--from-hf", metavar="SRC", help="a Hugging Face folder or hub id (openai/imagegpt-small)")
    direction.add_argument("--to-hf", metavar="DIR", help="an igpt run or model folder")
    convert.add_argument("--out", required=True, help="output folder")
    convert.add_argument("--palette", default=None, help="palette for an import without preprocessor_config.json")
    convert.set_defaults(func=_cmd_convert)

    sample = sub.add_parser("sample", help="generate images from a checkpoint (KV-cached)")
    _add_sampling_args(sample)
    sample.add_argument("--n", type=_positive_int, default=64, help="number of images")
    sample.set_defaults(func=_cmd_sample)

    complete = sub.add_parser("complete", help="complete the bottom of real images (the paper's figure)")
    _add_sampling_args(complete)
    _add_data_args(complete, default=None)
    complete.add_argument("--split", choices=("train", "val", "test"), default="test")
    complete.add_argument("--n", type=_positive_int, default=8, help="number of images")
    complete.add_argument("--samples", type=_positive_int, default=4, help="completions per image")
    keep = complete.add_mutually_exclusive_group()
    keep.add_argument("--keep-rows", type=int, default=None, help="rows kept from the top")
    keep.add_argument("--keep", type=float, default=0.5, help="fraction of rows kept (default: %(default)s)")
    complete.set_defaults(func=_cmd_complete)

    probe = sub.add_parser("probe", help="linear probe of every layer, against raw-pixel and random-init baselines")
    probe.add_argument("--ckpt", required=True, help="run folder")
    _add_data_args(probe, default=None)
    probe.add_argument("--layers", default="all", help="all, or comma-separated layers such as 0,4,8")
    probe.add_argument("--max-train", type=_positive_int, default=None, help="cap the training images (seeded subset)")
    probe.add_argument("--batch-size", type=_positive_int, default=256, help="images per forward pass")
    probe.add_argument("--no-baselines", action="store_true", help="skip the raw-pixel and random-init probes")
    probe.add_argument("--device", default=None)
    probe.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--out", default="probe.json", help="report JSON; the plot goes beside it (default: %(default)s)")
    probe.set_defaults(func=_cmd_probe)

    finetune = sub.add_parser("finetune", help="fine-tune a pretrained model with a classifier head")
    finetune.add_argument("--ckpt", required=True, help="pretrained run folder")
    _add_data_args(finetune, default=None)
    finetune.add_argument("--out", required=True, help="new folder for the fine-tuned model")
    finetune.add_argument("--gen-weight", type=float, default=1.0, help="weight of L_GEN beside L_CLF (0 allowed)")
    finetune.add_argument("--lr", type=float, default=None, help="default: the pretraining lr / 10")
    finetune.add_argument("--epochs", type=float, default=10.0)
    finetune.add_argument("--batch-size", type=_positive_int, default=64)
    finetune.add_argument("--patience", type=_positive_int, default=3, help="validations without gain before stopping")
    finetune.add_argument("--eval-every", type=_positive_int, default=None, help="steps between validations (default: an epoch)")
    finetune.add_argument("--no-augment", action="store_true", help="no pad/crop/flip augmentation")
    finetune.add_argument("--no-flip", action="store_true", help="pad and crop, but never mirror (digits, text)")
    finetune.add_argument("--from-scratch", action="store_true",
                          help="same network, random weights: the no-pretraining control")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--device", default=None)
    finetune.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    finetune.set_defaults(func=_cmd_finetune)

    classify = sub.add_parser("classify", help="predict the class of image files with a fine-tuned model")
    classify.add_argument("--ckpt", required=True, help="fine-tuned folder (from igpt finetune)")
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    classify.add_argument("--crop", action="store_true", help="centre-crop to square before resizing")
    classify.add_argument("--device", default=None)
    classify.set_defaults(func=_cmd_classify)
    return parser


def _version() -> str:
    from igpt import __version__

    return __version__


def _warn_emulated_bf16(args: argparse.Namespace) -> None:
    from igpt.distributed import resolve_device
    from igpt.train import precision_warning

    if getattr(args, "precision", None) == "bf16":
        warning = precision_warning(resolve_device(getattr(args, "device", None)), args.precision)
        if warning:
            print(f"igpt: {warning}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help() if args.command is None else parser.parse_args([args.command, "--help"])
        return 2
    try:
        _warn_emulated_bf16(args)
        args.func(args)
    except IgptError as err:
        print(f"igpt: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("igpt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
