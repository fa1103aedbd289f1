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


def _positive_ints(text: str) -> tuple[int, ...]:
    """"4,25,100" -> (4, 25, 100)."""
    try:
        return tuple(sorted({_positive_int(part) for part in text.split(",")}))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be comma-separated positive integers, got {text}") from None


def _add_data_flags(p: argparse.ArgumentParser, *, from_run: bool = False) -> None:
    """The data description's flags; `from_run`: for commands that read the run's description unless told."""
    from igpt.config import add_flags
    from igpt.data import DataConfig

    if from_run:
        add_flags(p, DataConfig, skip=("resolution",), inherit="the run's")
    else:
        add_flags(p, DataConfig)


def _run_data(args: argparse.Namespace, info, model_config):
    """The data description a later command reads: the run's, changed by the flags given."""
    from igpt.config import given_flags
    from igpt.data import DataConfig

    return info.data_for(model_config, **given_flags(DataConfig, args))


def _cmd_palette_fit(args: argparse.Namespace) -> None:
    from igpt.config import from_flags
    from igpt.data import DataConfig
    from igpt.palette import Palette

    train = from_flags(DataConfig, args).images("train")
    palette = Palette.fit(
        train.images, clusters=args.clusters, max_pixels=args.max_pixels, seed=args.seed, device=args.device, log=print
    )
    palette.save(args.out)
    print(f"wrote {args.out}: {palette.size} colours fitted on {train.describe()}")


def _cmd_train(args: argparse.Namespace) -> None:
    from igpt.config import from_flags
    from igpt.data import DataConfig
    from igpt.pretrain import PretrainConfig, Pretraining
    from igpt.train import Trainer

    task = Pretraining(from_flags(DataConfig, args), from_flags(PretrainConfig, args))
    trainer = Trainer(task, args.out, resume=args.resume)
    result = trainer.run()
    if trainer.world.is_main:
        best = result["best_val_loss"]
        print(f"done: step {result['step']}, best validation loss "
              f"{'not measured yet' if best is None else f'{best:.4f} nats/token'}; run folder {args.out}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from igpt.checkpoint import load_run
    from igpt.evaluate import evaluate_split

    model, palette, info = load_run(args.ckpt, args.device)
    data = _run_data(args, info, model.config)
    result = evaluate_split(model, palette, data, args.split, batch_size=args.batch_size, precision=args.precision)
    base = result["baselines"]
    print(f"{data.name} {args.split}: {result['nats_per_token']:.4f} nats/token = {result['bits_per_pixel']:.4f} "
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
    if args.animate:
        from igpt.animation import check_animation_path

        check_animation_path(args.animate)
    generator = torch.Generator(device=resolve_device(args.device)).manual_seed(args.seed)
    return dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, generator=generator,
                batch_size=args.batch_size, compile=args.compile)


def _load_for_sampling(args: argparse.Namespace):
    from igpt.checkpoint import load_run

    model, palette, run = load_run(args.ckpt, args.device)
    if model.config.objective != "ar":
        raise IgptError(f"{args.ckpt} holds a bert-objective model: sampling needs an ar model")
    return model, palette, run


def _cmd_sample(args: argparse.Namespace) -> None:
    import numpy as np

    from igpt.animation import Animation
    from igpt.fileio import atomic_write
    from igpt.precision import autocast
    from igpt.sample import sample, save_grid

    options = _sampling_options(args)  # validates before the model loads
    model, palette, _ = _load_for_sampling(args)
    device = next(model.parameters()).device
    animation = Animation(palette, args.n, model.config.side) if args.animate else None
    with autocast(device, args.precision):
        tokens = sample(model, args.n, watch=animation and animation.watch, **options)
    images = palette.decode(tokens.cpu().numpy())
    out = Path(args.out)
    save_grid(images, out)
    atomic_write(out.with_suffix(".npy"), lambda f: np.save(f, images))
    print(f"wrote {out} and {out.with_suffix('.npy')}: {args.n} samples" + _saved_animation(args, animation))


def _saved_animation(args: argparse.Namespace, animation) -> str:
    if animation is None:
        return ""
    animation.save(args.animate)
    return f"; the filling-in animation ({len(animation.frames)} frames) in {args.animate}"


def _cmd_complete(args: argparse.Namespace) -> None:
    import numpy as np

    from igpt.fileio import atomic_write
    from igpt.precision import autocast
    from igpt.animation import Animation
    from igpt.sample import completion_rows, save_grid

    options = _sampling_options(args)
    if args.keep_rows is None and not 0 <= args.keep <= 1:
        raise IgptError(f"--keep must lie in [0, 1], got {args.keep}")
    model, palette, info = _load_for_sampling(args)
    side = model.config.side
    keep_rows = args.keep_rows if args.keep_rows is not None else round(args.keep * side)
    originals, _, skipped = _own_or_split_images(args, info, model.config)
    animation = Animation.of_completions(palette, originals, keep_rows, args.samples) if args.animate else None
    with autocast(next(model.parameters()).device, args.precision):
        rows = completion_rows(model, palette, originals, keep_rows, args.samples,
                               watch=animation and animation.watch, **options)
    out = Path(args.out)
    save_grid(rows.reshape(-1, side, side, 3), out, columns=args.samples + 2)
    atomic_write(out.with_suffix(".npy"), lambda f: np.save(f, rows))
    print(f"wrote {out}: {len(rows)} images x {args.samples} completions from the top {keep_rows} of {side} rows"
          + (f" ({len(skipped)} unreadable files skipped)" if skipped else "") + _saved_animation(args, animation))


def _own_or_split_images(args: argparse.Namespace, info, model_config):
    """The images named on the command line (centre-cropped, resized as training data), else the first
    --n of the run's split; with their names, and the names of the files skipped."""
    import numpy as np

    from igpt.data import read_images

    if args.images:
        images, skipped = read_images(args.images, model_config.side, skip_bad=bool(args.skip_bad))
        return images, [p for p in args.images if p not in skipped], skipped
    images = np.asarray(_run_data(args, info, model_config).images(args.split).images[: args.n])
    return images, [f"{args.split} image {i}" for i in range(len(images))], []


def _cmd_surprise(args: argparse.Namespace) -> None:
    from igpt.checkpoint import load_run
    from igpt.evaluate import pixel_bits
    from igpt.plots import surprise_maps

    model, palette, info = load_run(args.ckpt, args.device)
    images, names, skipped = _own_or_split_images(args, info, model.config)
    bits = pixel_bits(model, palette.encode(images).astype("int64"), rounds=args.rounds, seed=args.seed,
                      precision=args.precision)
    surprise_maps(images, bits.numpy(), names, args.out)
    means = ", ".join(f"{b.mean():.2f}" for b in bits)
    print(f"wrote {args.out}: bits/pixel {means}" + (f" ({len(skipped)} unreadable files skipped)" if skipped else ""))
    if args.json:
        from igpt.fileio import atomic_write_json

        atomic_write_json(args.json, {"images": names, "bits_per_pixel": [float(b.mean()) for b in bits],
                                      "pixel_bits": bits.tolist(), "objective": model.config.objective})


def _cmd_fid(args: argparse.Namespace) -> None:
    from igpt import fid
    from igpt.checkpoint import load_run
    from igpt.config import given_flags
    from igpt.data import DataConfig
    from igpt.distributed import resolve_device
    from igpt.fileio import atomic_write_json, check_folder

    fid.check_dims(args.dims)
    if args.n is not None:
        fid.check_n(args.n)
    out = check_folder(args.json)
    if out.suffix.lower() != ".json":
        raise IgptError(f"--json {out} must name a .json file")
    if args.ckpt is None and args.images is None:
        raise IgptError("give --ckpt RUN to score its samples, or --images X (with --ckpt RUN or --data) to score those")
    if args.ckpt is None and (args.name is None or args.resolution is None):
        raise IgptError("--images without --ckpt needs --data and --resolution: the real images to compare with")
    if args.images is None:
        model, palette, info = _load_for_sampling(args)
    elif args.ckpt is not None:
        model, palette, info = load_run(args.ckpt, args.device)
    if args.ckpt is not None:
        if args.resolution not in (None, model.config.side):
            raise IgptError(f"--resolution {args.resolution} differs from the model's {model.config.side}: leave it out")
        data = _run_data(args, info, model.config)
    else:
        data = DataConfig(**given_flags(DataConfig, args))
    extractor = fid.inception(args.dims, args.fid_weights)  # the offline check, before any data or sampling work
    if args.images is None:
        result = fid.score_samples(model, palette, data, extractor, n=args.n or 5000, split=args.split,
                                   batch_size=args.batch_size, seed=args.seed, run=args.ckpt)
    else:
        result = fid.score_files(args.images, data, extractor, n=args.n, split=args.split,
                                 batch_size=args.batch_size, device=resolve_device(args.device),
                                 seed=args.seed)
    result["dims"] = args.dims
    print(fid.summary(result))
    atomic_write_json(out, result)
    print(f"wrote {out}")


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
    p.add_argument("--animate", default=None, metavar="GIF_OR_WEBP",
                   help="also write the images filling in, a frame every few rows (.gif or .webp)")


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
        model.config.check_palette(palette, args.from_hf)
        RunFolder.save_model(Path(args.out), model, palette, None)
        print(f"wrote {args.out}: {model.config.n_layer} layers, width {model.config.n_embd}, {palette.size} colours")
    else:
        from igpt.checkpoint import load_run

        model, palette, _ = load_run(args.to_hf, "cpu")
        hf.to_hf(model, palette, args.out)
        print(f"wrote {args.out}: loads with transformers.ImageGPTForCausalImageModeling.from_pretrained")


def _cmd_probe(args: argparse.Namespace) -> None:
    from igpt import plots
    from igpt.checkpoint import load_run
    from igpt.fileio import atomic_write_json
    from igpt.finetune import labelled_splits
    from igpt.probe import Protocols, Split, linear_probe, parse_layers, summary

    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise IgptError(f"--out {out} must name a .json file (probe.png is written beside it)")
    model, palette, info = load_run(args.ckpt, args.device)
    layers = parse_layers(args.layers, model.config.n_layer)  # a bad --layers fails before any data work
    protocols = Protocols(args.labels_per_class, args.draws, args.concat_layers, args.pool_grid).check(model.config)
    data = _run_data(args, info, model.config)
    tokensets = labelled_splits(data, palette)
    splits = {name: Split.of(s, args.max_train if name == "train" else None, args.seed) for name, s in tokensets.items()}
    classes = tokensets["train"].classes
    report = linear_probe(model, splits, n_classes=len(classes), layers=layers, protocols=protocols,
                          batch_size=args.batch_size, precision=args.precision, baselines=not args.no_baselines,
                          seed=args.seed, progress=True)
    report.update(ckpt=str(args.ckpt), data=data.name, classes=list(classes), objective=model.config.objective)
    atomic_write_json(out, report)
    plots.probe_accuracy(report, out.with_suffix(".png"))
    print(summary(report))
    print(f"wrote {out} and {out.with_suffix('.png')}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from igpt.config import from_flags, given_flags
    from igpt.data import DataConfig
    from igpt.finetune import FinetuneConfig, Finetuning
    from igpt.train import Trainer

    task = Finetuning(args.ckpt, from_flags(FinetuneConfig, args), given_flags(DataConfig, args))
    Trainer(task, args.out, resume=args.resume).run()


def _cmd_classify(args: argparse.Namespace) -> None:
    import numpy as np

    from igpt.data.images import decode, fit_to
    from igpt.evaluate import predict
    from igpt.finetune import load_classifier

    model, palette, classes = load_classifier(args.ckpt, args.device)
    side = model.config.side
    images = np.stack([fit_to(decode(Path(path), str(path)), side, args.crop) for path in args.images])
    probs = predict(model, palette.encode(images))
    for path, p in zip(args.images, probs):
        k = int(p.argmax())
        name = classes[k] if classes and k < len(classes) else str(k)
        print(f"{path}\t{name}\t{p[k]:.3f}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from igpt.demo import run_demo

    run_demo(args.name, args.out, budget_minutes=args.budget_minutes, steps=args.steps, device=args.device,
             seed=args.seed, data_dir=args.data_dir, positions=args.positions, attention=args.attention,
             window_rows=args.window_rows)


def _cmd_serve(args: argparse.Namespace) -> None:
    from igpt.config import given_flags
    from igpt.data import DataConfig
    from igpt.serve import require_gradio, serve

    require_gradio()  # before the model loads
    serve(args.ckpt, host=args.host, port=args.port, device=args.device, precision=args.precision,
          max_upload_mb=args.max_upload_mb, data=given_flags(DataConfig, args))


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag costs one line (problem and where to look), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from igpt.config import add_flags
    from igpt.data import DataConfig
    from igpt.demo import DEFAULT_DATA, budget_help
    from igpt.finetune import FinetuneConfig
    from igpt.pretrain import PretrainConfig
    from igpt.serve import MAX_UPLOAD_MB

    parser = _Parser(prog="igpt", description="Image GPT: generative pretraining from pixels.")
    parser.add_argument("--version", action="version", version=f"igpt {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="the whole pipeline on a data set in a few minutes, with a report")
    add_flags(demo, DataConfig, only=("name", "data_dir"), defaults={"name": DEFAULT_DATA})
    demo.add_argument("--out", default=None, help="output folder (default: a new igpt-demo-<data> folder)")
    demo.add_argument("--budget-minutes", type=float, default=None,
                      help=f"wall-time target in minutes (default: {budget_help()})")
    demo.add_argument("--steps", type=_positive_int, default=None, help="train exactly this many steps instead")
    add_flags(demo, PretrainConfig, only=("device", "seed", "positions", "attention", "window_rows"))
    demo.set_defaults(func=_cmd_demo)

    palette = sub.add_parser("palette", help="fit or inspect a colour palette")
    palette_sub = palette.add_subparsers(dest="palette_command", metavar="ACTION")
    fit = palette_sub.add_parser("fit", help="k-means colour palette over a data set's training pixels")
    _add_data_flags(fit)
    add_flags(fit, PretrainConfig, only=("clusters", "seed", "device"))
    fit.add_argument("--out", required=True, help="output .npy (or preprocessor_config.json for Hugging Face)")
    fit.add_argument("--max-pixels", type=_positive_int, default=2_000_000, help="pixels sampled (default: %(default)s)")
    fit.set_defaults(func=_cmd_palette_fit)

    train = sub.add_parser("train", help="pretrain a model (AR or BERT objective) into a run folder")
    _add_data_flags(train)
    add_flags(train, PretrainConfig)
    train.add_argument("--out", required=True, help="run folder")
    train.add_argument("--resume", action="store_true", help="continue the run in --out exactly")
    train.set_defaults(func=_cmd_train)

    evaluate = sub.add_parser("eval", help="exact loss (nats/token, bits/pixel) of a checkpoint on a split")
    evaluate.add_argument("--ckpt", required=True, help="run folder")
    _add_data_flags(evaluate, from_run=True)
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
    _add_data_flags(complete, from_run=True)
    complete.add_argument("images", nargs="*", help="your own image files (any size: centre-cropped, resized); "
                          "without them, the first --n images of --split")
    complete.add_argument("--split", choices=("train", "val", "test"), default="test")
    complete.add_argument("--n", type=_positive_int, default=8, help="number of images")
    complete.add_argument("--samples", type=_positive_int, default=4, help="completions per image")
    keep = complete.add_mutually_exclusive_group()
    keep.add_argument("--keep-rows", type=int, default=None, help="rows kept from the top")
    keep.add_argument("--keep", type=float, default=0.5, help="fraction of rows kept (default: %(default)s)")
    complete.set_defaults(func=_cmd_complete)

    surprise = sub.add_parser("surprise", help="per-pixel bits under the model: what it finds unexpected in a picture")
    surprise.add_argument("--ckpt", required=True, help="run folder (or a converted model folder)")
    surprise.add_argument("images", nargs="*", help="image files (any size: centre-cropped, resized); "
                          "without them, the first --n images of --split")
    _add_data_flags(surprise, from_run=True)
    surprise.add_argument("--split", choices=("train", "val", "test"), default="test")
    surprise.add_argument("--n", type=_positive_int, default=4, help="number of images from --split")
    surprise.add_argument("--rounds", type=_positive_int, default=2,
                          help="bert: times each pixel is masked and predicted (default: %(default)s)")
    surprise.add_argument("--seed", type=int, default=0, help="bert: seed of the masks")
    surprise.add_argument("--device", default=None)
    surprise.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    surprise.add_argument("--out", required=True, help="output PNG: each image beside its heat map")
    surprise.add_argument("--json", default=None, help="also write every pixel's bits as JSON")
    surprise.set_defaults(func=_cmd_surprise)

    fid = sub.add_parser("fid", help="FID and KID of samples (or of given images) against a real split")
    fid.add_argument("--ckpt", default=None, help="run folder: its samples are scored, or it names the data and size")
    fid.add_argument("--images", default=None, metavar="X",
                     help="score these instead of sampling: a folder of images or an .npy of uint8 (N, H, W, 3)")
    fid.add_argument("--n", type=int, default=None,
                     help="images on each side (default: 5000 samples, or every image of --images)")
    _add_data_flags(fid, from_run=True)
    add_flags(fid, DataConfig, only=("resolution",), inherit="the model's; needed with --images and no --ckpt")
    fid.add_argument("--split", choices=("train", "val", "test"), default="test")
    fid.add_argument("--dims", type=int, default=2048,
                     help="Inception-v3 features: 64 | 192 | 768 | 2048 (default: %(default)s); "
                          "FIDs at different sizes are not comparable")
    fid.add_argument("--batch-size", type=_positive_int, default=100,
                     help="images sampled, and fed to Inception, at once (default: %(default)s)")
    fid.add_argument("--device", default=None)
    fid.add_argument("--fid-weights", default=None, metavar="PATH",
                     help="a local copy of torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
                          "(default: torch hub's cache, downloaded once)")
    fid.add_argument("--seed", type=int, default=0, help="sampling, the real subset and KID's subsets")
    fid.add_argument("--json", default="fid.json", help="where the result goes (default: %(default)s)")
    fid.set_defaults(func=_cmd_fid)

    serve = sub.add_parser("serve", help="a local web page: pick, upload or draw a picture and watch the model "
                           "complete it (pip install 'igpt[app]')")
    serve.add_argument("--ckpt", required=True, help="run folder (or a converted model folder)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to serve on (default: %(default)s, this machine only; 0.0.0.0 serves "
                            "other machines too)")
    serve.add_argument("--port", type=_positive_int, default=7860, help="default: %(default)s")
    serve.add_argument("--device", default=None)
    serve.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    serve.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_MB,
                       help="largest image file the page accepts (default: %(default)s)")
    _add_data_flags(serve, from_run=True)
    serve.set_defaults(func=_cmd_serve)

    probe = sub.add_parser("probe", help="linear probe of every layer, against raw-pixel and random-init baselines")
    probe.add_argument("--ckpt", required=True, help="run folder")
    _add_data_flags(probe, from_run=True)
    probe.add_argument("--layers", default="all", help="all, or comma-separated layers such as 0,4,8")
    probe.add_argument("--max-train", type=_positive_int, default=None, help="cap the training images (seeded subset)")
    probe.add_argument("--batch-size", type=_positive_int, default=None,
                       help="images per forward pass (default: sized for the device, igpt.probe.feature_batch_size)")
    probe.add_argument("--labels-per-class", type=_positive_ints, default=(), metavar="K[,K...]",
                       help="also the low-data probe: K labelled training images per class, such as 4,25,100")
    probe.add_argument("--draws", type=_positive_int, default=5, help="seeded draws per K (default: %(default)s)")
    probe.add_argument("--concat-layers", default=(), metavar="L,L[,...]",
                       help="also probe these layers' features concatenated, such as 2,3,4")
    probe.add_argument("--pool-grid", type=_positive_int, default=1, metavar="G",
                       help="pool each layer over a GxG grid of image cells, G*G*n_embd features (default: 1, the "
                       "paper's mean over all positions)")
    probe.add_argument("--no-baselines", action="store_true", help="skip the raw-pixel and random-init probes")
    probe.add_argument("--device", default=None)
    probe.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    probe.add_argument("--seed", type=int, default=0)
    probe.add_argument("--out", default="probe.json", help="report JSON; the plot goes beside it (default: %(default)s)")
    probe.set_defaults(func=_cmd_probe)

    finetune = sub.add_parser("finetune", help="fine-tune a pretrained model with a classifier head")
    finetune.add_argument("--ckpt", required=True, help="pretrained run folder")
    _add_data_flags(finetune, from_run=True)
    finetune.add_argument("--out", required=True, help="new folder for the fine-tuned model (a run folder)")
    finetune.add_argument("--resume", action="store_true", help="continue the fine-tuning run in --out exactly")
    add_flags(finetune, FinetuneConfig)
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
    from igpt.precision import precision_warning

    if getattr(args, "precision", None) == "bf16":
        warning = precision_warning(resolve_device(getattr(args, "device", None)), args.precision)
        if warning:
            print(f"igpt: {warning}", file=sys.stderr)


def sets_the_allocator(name: str) -> bool:
    """Whether environment variable `name` is a user's choice of, or for, the C allocator."""
    return name in ("LD_PRELOAD", "GLIBC_TUNABLES") or name.startswith("MALLOC_")


def reuse_freed_memory() -> bool:
    """Have glibc keep the memory PyTorch frees for its next tensors (True where it did).

    By default glibc maps every large allocation afresh and unmaps it on free, so each step's activations are
    page-faulted in and zeroed by the kernel again; training steps and the probe's passes ran measurably faster
    without that (README, "Speed"). PyTorch's CPU guides give the same reason for jemalloc or tcmalloc, which pip
    cannot install: these are glibc's own settings (no large allocation by mmap; give memory back only past 1 GiB
    free). Left alone where the allocator is not glibc's or the user has tuned or replaced it.
    """
    import ctypes
    import os
    import platform

    if platform.libc_ver()[0] != "glibc" or any(map(sets_the_allocator, os.environ)):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 1 << 30))


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


def command() -> int:
    """The `igpt` executable: main() in a process of its own, so its allocator settings are the command's to make."""
    reuse_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(command())
