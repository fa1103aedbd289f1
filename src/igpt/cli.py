"""The `igpt` command: a thin layer of argument parsing over the library.

Every flag is a field of a settings dataclass that lives beside the concern it configures
(`igpt.config.add_flags` makes the flags); `_commands` lists each command's help, its
settings and its `_cmd_*` function, which takes the parsed arguments and calls the library's
pipeline for the job. User errors are `IgptError`s, printed by `main` as one line with a
non-zero exit.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from igpt.errors import IgptError


def _run_data(args: argparse.Namespace, info, model_config):
    """The data description a later command reads: the run's, changed by the flags given."""
    from igpt.config import given_flags
    from igpt.data import DataConfig

    return info.data_for(model_config, **given_flags(DataConfig, args))


def _own_or_split_images(cfg, args: argparse.Namespace, info, model_config):
    """The images named on the command line (centre-cropped, resized as training data), else the first
    `cfg.n` of the run's `cfg.split`; with their names, and the names of the files skipped."""
    import numpy as np

    from igpt.data import read_images

    if cfg.images:
        images, skipped = read_images(cfg.images, model_config.side, skip_bad=bool(args.skip_bad))
        if skipped:
            print(f"{len(skipped)} unreadable files skipped: {', '.join(map(str, skipped))}")
        return images, [p for p in cfg.images if p not in skipped]
    images = np.asarray(_run_data(args, info, model_config).images(cfg.split).images[: cfg.n])
    return images, [f"{cfg.split} image {i}" for i in range(len(images))]


def _load_for_sampling(cfg):
    """The run at `cfg.ckpt` on `cfg.device`, refused unless its model can sample (an ar model)."""
    from igpt.checkpoint import load_run

    model, palette, info = load_run(cfg.ckpt, cfg.device)
    if model.config.objective != "ar":
        raise IgptError(f"{cfg.ckpt} holds a bert-objective model: sampling needs an ar model")
    return model, palette, info


def _cmd_demo(args: argparse.Namespace) -> None:
    from igpt.config import from_flags
    from igpt.demo import PRETRAIN_FLAGS, DemoConfig, default_out, run_demo
    from igpt.progress import OutputOptions

    output, cfg = from_flags(OutputOptions, args), from_flags(DemoConfig, args)
    out = cfg.out or default_out(args.name)
    result = run_demo(args.name, data_dir=args.data_dir, **{**dataclasses.asdict(cfg), "out": out}, log=output.log,
                      progress=output.progress, **{name: getattr(args, name) for name in PRETRAIN_FLAGS})
    if output.quiet:  # the demo's own closing summary went to the silenced log
        print(f"done: test {result['eval']['bits_per_pixel']:.3f} bits/pixel; report {Path(out) / 'report.html'}")


def _cmd_palette_fit(args: argparse.Namespace) -> None:
    from igpt.config import from_flags
    from igpt.data import DataConfig
    from igpt.palette import Palette, PaletteFitConfig
    from igpt.progress import OutputOptions

    cfg = from_flags(PaletteFitConfig, args)
    train = from_flags(DataConfig, args).images("train")
    palette = Palette.fit(train.images, clusters=cfg.clusters, max_pixels=cfg.max_pixels, seed=cfg.seed,
                          device=cfg.device, log=from_flags(OutputOptions, args).log)
    palette.save(cfg.out)
    print(f"wrote {cfg.out}: {palette.size} colours fitted on {train.describe()}")


def _cmd_train(args: argparse.Namespace) -> None:
    from igpt.config import RunFolderOptions, from_flags, given_flags
    from igpt.data import DataConfig
    from igpt.pretrain import PretrainConfig, Pretraining, planned
    from igpt.progress import OutputOptions
    from igpt.train import Trainer

    run, output = from_flags(RunFolderOptions, args), from_flags(OutputOptions, args)
    resuming = run.out if run.resume else None  # its recorded plan, not a new one
    data, cfg = planned(given_flags(DataConfig, args), given_flags(PretrainConfig, args), resuming)
    trainer = Trainer(Pretraining(data, cfg), run.out, resume=run.resume, log=output.log, progress=output.progress)
    result = trainer.run()
    if trainer.world.is_main:
        best = result["best_val_loss"]
        print(f"done: step {result['step']}, best validation loss "
              f"{'not measured yet' if best is None else f'{best:.4f} nats/token'}; run folder {run.out}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from igpt.checkpoint import load_run
    from igpt.config import from_flags
    from igpt.evaluate import EvalConfig, evaluate_split
    from igpt.fileio import atomic_write_json

    cfg = from_flags(EvalConfig, args)
    model, palette, info = load_run(cfg.ckpt, cfg.device)
    data = _run_data(args, info, model.config)
    result = evaluate_split(model, palette, data, cfg.split, batch_size=cfg.batch_size, precision=cfg.precision)
    base = result["baselines"]
    print(f"{data.name} {cfg.split}: {result['nats_per_token']:.4f} nats/token = {result['bits_per_pixel']:.4f} "
          f"bits/pixel over {result['n_images']:,} images (uniform {base['uniform_bits_per_pixel']:.3f}, "
          f"unigram {base['unigram_bits_per_pixel']:.3f} bits/pixel)")
    if cfg.json:
        atomic_write_json(cfg.json, result)


def _cmd_sample(args: argparse.Namespace) -> None:
    from igpt.config import from_flags
    from igpt.sample import SampleConfig, write_samples

    cfg = from_flags(SampleConfig, args)
    cfg.check()  # before the model loads
    model, palette, _ = _load_for_sampling(cfg)
    write_samples(model, palette, cfg)


def _cmd_complete(args: argparse.Namespace) -> None:
    from igpt.config import from_flags
    from igpt.sample import CompletionConfig, write_completions

    cfg = from_flags(CompletionConfig, args)
    cfg.check()
    model, palette, info = _load_for_sampling(cfg)
    originals, _ = _own_or_split_images(cfg, args, info, model.config)
    write_completions(model, palette, originals, cfg)


def _cmd_surprise(args: argparse.Namespace) -> None:
    from igpt.checkpoint import load_run
    from igpt.config import from_flags
    from igpt.evaluate import SurpriseConfig, write_surprise

    cfg = from_flags(SurpriseConfig, args)
    model, palette, info = load_run(cfg.ckpt, cfg.device)
    write_surprise(model, palette, *_own_or_split_images(cfg, args, info, model.config), cfg)


def _cmd_fid(args: argparse.Namespace) -> None:
    from igpt import fid
    from igpt.checkpoint import load_run
    from igpt.config import from_flags, given_flags
    from igpt.data import DataConfig
    from igpt.fileio import atomic_write_json

    cfg = from_flags(fid.FidConfig, args)
    out = cfg.check(given_flags(DataConfig, args))
    model = palette = None
    if cfg.ckpt is None:
        data = DataConfig(**given_flags(DataConfig, args))
    else:
        model, palette, info = _load_for_sampling(cfg) if cfg.images is None else load_run(cfg.ckpt, cfg.device)
        if args.resolution not in (None, model.config.side):
            raise IgptError(f"--resolution {args.resolution} differs from the model's {model.config.side}: leave it out")
        data = _run_data(args, info, model.config)
    result = fid.score(cfg, data, model, palette)
    print(fid.summary(result))
    atomic_write_json(out, result)
    print(f"wrote {out}")


def _cmd_convert(args: argparse.Namespace) -> None:
    from igpt import hf
    from igpt.checkpoint import RunFolder, load_run
    from igpt.config import from_flags
    from igpt.palette import Palette

    cfg = from_flags(hf.ConvertConfig, args)
    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise IgptError(f"--out {out} exists and is not an empty folder: choose a new one")
    if cfg.from_hf:
        model, palette = hf.from_hf(cfg.from_hf)
        palette = Palette.load(cfg.palette) if cfg.palette else palette
        if palette is None:
            raise IgptError(f"{cfg.from_hf} has no preprocessor_config.json with the palette: pass --palette PATH")
        model.config.check_palette(palette, cfg.from_hf)
        RunFolder.save_model(out, model, palette, None)
        print(f"wrote {out}: {model.config.n_layer} layers, width {model.config.n_embd}, {palette.size} colours")
    else:
        model, palette, _ = load_run(cfg.to_hf, "cpu")
        hf.to_hf(model, palette, out, card=hf.ModelCard.of_run(cfg.to_hf, remaking_command))
        print(f"wrote {out}: loads with transformers.ImageGPTForCausalImageModeling.from_pretrained; "
              f"model card {out / hf.MODEL_CARD}")


def _cmd_probe(args: argparse.Namespace) -> None:
    from igpt.checkpoint import load_run
    from igpt.config import from_flags
    from igpt.probe import ProbeConfig, Protocols, run_probe, summary
    from igpt.progress import OutputOptions

    cfg, output = from_flags(ProbeConfig, args), from_flags(OutputOptions, args)
    model, palette, info = load_run(cfg.ckpt, cfg.device)
    report = run_probe(model, palette, _run_data(args, info, model.config), cfg, from_flags(Protocols, args),
                       log=output.log, progress=output.progress)
    output.log(summary(report))
    print(f"wrote {cfg.out} and {Path(cfg.out).with_suffix('.png')}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from igpt.config import from_flags, given_flags
    from igpt.data import DataConfig
    from igpt.finetune import FinetuneConfig, FinetuneRun, Finetuning
    from igpt.progress import OutputOptions
    from igpt.train import Trainer

    run, output = from_flags(FinetuneRun, args), from_flags(OutputOptions, args)
    task = Finetuning(run.ckpt, from_flags(FinetuneConfig, args), given_flags(DataConfig, args))
    trainer = Trainer(task, run.out, resume=run.resume, log=output.log, progress=output.progress)
    result = trainer.run()
    if trainer.world.is_main and "test_acc" in result:
        print(f"done: step {result['steps']}, test accuracy {100 * result['test_acc']:.2f}%; run folder {run.out}")


def _cmd_classify(args: argparse.Namespace) -> None:
    import numpy as np

    from igpt.config import from_flags
    from igpt.data.images import decode, fit_to
    from igpt.evaluate import predict
    from igpt.finetune import ClassifyConfig, load_classifier

    cfg = from_flags(ClassifyConfig, args)
    model, palette, classes = load_classifier(cfg.ckpt, cfg.device)
    side = model.config.side
    images = np.stack([fit_to(decode(Path(path), str(path)), side, cfg.crop) for path in cfg.images])
    for path, p in zip(cfg.images, predict(model, palette.encode(images))):
        k = int(p.argmax())
        name = classes[k] if classes and k < len(classes) else str(k)
        print(f"{path}\t{name}\t{p[k]:.3f}")


def _cmd_info(args: argparse.Namespace) -> None:
    import json

    from igpt.config import from_flags
    from igpt.info import InfoConfig, environment, format_environment

    facts = environment()
    print(json.dumps(facts, indent=2) if from_flags(InfoConfig, args).json else format_environment(facts))


def _cmd_serve(args: argparse.Namespace) -> None:
    from igpt.config import from_flags, given_flags
    from igpt.data import DataConfig
    from igpt.serve import ServeConfig, require_gradio, serve

    require_gradio()  # before the model loads
    serve(**dataclasses.asdict(from_flags(ServeConfig, args)), data=given_flags(DataConfig, args))


def _commands() -> list[tuple[str, str, object, list[tuple[type, dict]]]]:
    """Every command: its name ("group action" for a nested one), help, `_cmd_*` function, and the settings
    dataclasses its flags come from, each with add_flags' options."""
    from igpt.config import RunFolderOptions
    from igpt.data import DataConfig
    from igpt.demo import DEFAULT_DATA, PRETRAIN_FLAGS, DemoConfig
    from igpt.evaluate import EvalConfig, SurpriseConfig
    from igpt.fid import FidConfig
    from igpt.finetune import ClassifyConfig, FinetuneConfig, FinetuneRun
    from igpt.hf import ConvertConfig
    from igpt.info import InfoConfig
    from igpt.palette import PaletteFitConfig
    from igpt.pretrain import PretrainConfig
    from igpt.probe import ProbeConfig, Protocols
    from igpt.progress import OutputOptions
    from igpt.sample import CompletionConfig, SampleConfig
    from igpt.serve import ServeConfig

    run_data = (DataConfig, {"skip": ("resolution",), "inherit": "the run's"})  # a later command: the run's data
    return [
        ("demo", "the whole pipeline on a data set in a few minutes, with a report", _cmd_demo,
         [(DataConfig, {"only": ("name", "data_dir"), "defaults": {"name": DEFAULT_DATA}}), (DemoConfig, {}),
          (PretrainConfig, {"only": PRETRAIN_FLAGS}), (OutputOptions, {})]),
        ("palette fit", "k-means colour palette over a data set's training pixels", _cmd_palette_fit,
         [(DataConfig, {}), (PaletteFitConfig, {}), (OutputOptions, {})]),
        ("train", "pretrain a model (AR or BERT objective) into a run folder", _cmd_train,
         [(DataConfig, {"skip": ("resolution",)}), (DataConfig, {"only": ("resolution",), "inherit": "the data's "
                                                                 "own size, up to 32"}),
          (PretrainConfig, {}), (RunFolderOptions, {}), (OutputOptions, {})]),
        ("eval", "exact loss (nats/token, bits/pixel) of a checkpoint on a split", _cmd_eval,
         [(EvalConfig, {}), run_data]),
        ("convert", "import Hugging Face ImageGPT weights, or export them with a model card", _cmd_convert,
         [(ConvertConfig, {})]),
        ("sample", "generate images from a checkpoint (KV-cached)", _cmd_sample, [(SampleConfig, {})]),
        ("complete", "complete the bottom of real images (the paper's figure)", _cmd_complete,
         [(CompletionConfig, {}), run_data]),
        ("surprise", "per-pixel bits under the model: what it finds unexpected in a picture", _cmd_surprise,
         [(SurpriseConfig, {}), run_data]),
        ("fid", "FID and KID of samples (or of given images) against a real split", _cmd_fid,
         [(FidConfig, {}), run_data,
          (DataConfig, {"only": ("resolution",), "inherit": "the model's; needed with --images and no --ckpt"})]),
        ("serve", "a local web page: pick, upload or draw a picture and watch the model complete it "
                  "(pip install 'igpt[app]')", _cmd_serve, [(ServeConfig, {}), run_data]),
        ("probe", "linear probe of every layer, against raw-pixel and random-init baselines", _cmd_probe,
         [(ProbeConfig, {}), (Protocols, {}), run_data, (OutputOptions, {})]),
        ("finetune", "fine-tune a pretrained model with a classifier head", _cmd_finetune,
         [(FinetuneRun, {}), run_data, (FinetuneConfig, {}), (OutputOptions, {})]),
        ("classify", "predict the class of image files with a fine-tuned model", _cmd_classify,
         [(ClassifyConfig, {})]),
        ("info", "versions, CPU, GPU, kernel and caches: what a bug report needs", _cmd_info, [(InfoConfig, {})]),
    ]


GROUPS = {"palette": "fit or inspect a colour palette"}  # commands with actions of their own


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag costs one line (problem and where to look), not a usage dump."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from igpt import __version__
    from igpt.config import add_flags

    parser = _Parser(prog="igpt", description="Image GPT: generative pretraining from pixels.")
    parser.add_argument("--version", action="version", version=f"igpt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    actions = {}
    for name, help_text, run, settings in _commands():
        group, _, action = name.rpartition(" ")
        if group and group not in actions:
            actions[group] = sub.add_parser(group, help=GROUPS[group]).add_subparsers(
                dest=f"{group}_command", metavar="ACTION")
        command = (actions[group] if group else sub).add_parser(action, help=help_text)
        for cls, options in settings:
            add_flags(command, cls, **options)
        command.set_defaults(func=run)
    return parser


# ---- the command that makes a recorded run again ----------------------------------------------
KIND_COMMANDS = {"pretrain": "train", "finetune": "finetune"}  # run.json's kind: the command that makes such a run
RUN_PLACEHOLDER = "RUN"  # --out of a remade run: run.json does not record where it was written
STATED = ("name", "resolution")  # written out even where they are the defaults: what a reader looks for first


def command_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of every command, in the parser's order: "train", "palette fit", ..."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help or "" for choice in action._choices_actions}
            for name, sub in action.choices.items():
                nested = command_parsers(sub, f"{prefix}{name} ")
                out.extend(nested or [(prefix + name, helps.get(name, ""), sub)])
    return out


def _flag_words(action: argparse.Action, value) -> list[str]:
    """The words that set `action`'s value to `value` (none where the default already gives it, but for STATED)."""
    if value is None or (value == action.default and action.dest not in STATED):
        return []
    if action.nargs == 0:
        if isinstance(action, argparse.BooleanOptionalAction):
            return [action.option_strings[0 if value else 1]]
        return [action.option_strings[0]] if value else []
    if isinstance(value, (list, tuple)):
        values = [str(v) for v in value] if action.nargs in ("*", "+") else [",".join(map(str, value))]
    else:
        values = [str(value)]
    return [action.option_strings[0], *values]


def remaking_command(record: dict) -> str | None:
    """The `igpt train` (or `igpt finetune`) command, with --out RUN_PLACEHOLDER, whose flags give the settings a
    run.json records; None for a record no command makes."""
    name = KIND_COMMANDS.get(record.get("kind"))
    if name is None:
        return None
    command = next(sub for listed, _, sub in command_parsers(build_parser()) if listed == name)
    values = {**(record.get("data") or {}), **(record.get("config") or {}), "ckpt": record.get("source"),
              "out": RUN_PLACEHOLDER}
    words = ["igpt", name]
    for action in command._actions:
        if action.option_strings and action.dest in values:
            words += _flag_words(action, values[action.dest])
    return shlex.join(words)


PLANNED = ("train", "finetune", "demo")  # commands whose plan line, before the first step, names the precision


def _choose_precision(args: argparse.Namespace) -> tuple[str | None, bool]:
    """--precision resolved once for the command (auto: bf16 where native) and passed on resolved, so the files
    it writes record what ran; returns the line that says what was chosen and why, and whether it warns (bf16
    asked for where it runs emulated)."""
    from igpt.distributed import resolve_device
    from igpt.precision import bf16_native, precision_choice, resolve_precision

    if getattr(args, "precision", None) is None:
        return None, False
    device = resolve_device(getattr(args, "device", None))
    line = precision_choice(args.precision, device)
    args.precision = resolve_precision(args.precision, device)
    return line, args.precision == "bf16" and not bf16_native(device)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help() if args.command is None else parser.parse_args([args.command, "--help"])
        return 2
    try:
        precision, warns = _choose_precision(args)
        if warns:
            print(f"igpt: {precision}", file=sys.stderr)
        args.func(args)
        if precision and not warns and args.command not in PLANNED and not getattr(args, "quiet", False):
            print(f"igpt: {precision}", file=sys.stderr)
    except IgptError as err:
        print(f"igpt: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("igpt: interrupted", file=sys.stderr)
        return 130
    return 0


def command() -> int:
    """The `igpt` executable: main() in a process of its own, so its allocator settings are the command's to make."""
    from igpt.runtime import reuse_freed_memory

    reuse_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(command())
