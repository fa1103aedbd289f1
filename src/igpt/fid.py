"""FID and KID: how far generated images lie from real ones, in a feature network's space.

The arithmetic is torchmetrics' (`FrechetInceptionDistance`, `KernelInceptionDistance`); the
standard network is torch-fidelity's Inception-v3 with the TensorFlow weights of 2015-12-05,
which torchmetrics builds as `NoTrainInceptionV3`. Both live in the `fid` extra and are
imported only here, inside functions, so the rest of igpt never needs them.

Preprocessing is the same on both sides: the real split is read exactly as training data are
(`DataConfig.images` at the model's resolution), samples are decoded from the palette, and
images given as files are fitted to that resolution the same way. Both then go to the network
as uint8 (N, 3, R, R); it resizes them to 299 x 299 itself, with TensorFlow 1's bilinear
resize as torch-fidelity does, so the values are those of the reference implementation.

Any `torch.nn.Module` taking that uint8 batch to features (N, d) can stand in for Inception:
torchmetrics' own custom-feature contract. The features of each set are extracted once and
both metrics read them, through a pass-through module in torchmetrics' `feature` slot.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from igpt.config import device_option, option, positive_int, seed_option
from igpt.data import split_option
from igpt.data.images import fit_to, read_images
from igpt.distributed import resolve_device
from igpt.errors import IgptError
from igpt.fileio import check_folder
from igpt.precision import autocast, precision_option

DIMS = (64, 192, 768, 2048)  # the Inception-v3 layers torch-fidelity exposes; FID differs between them
WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
INSTALL = "pip install 'igpt[fid]' \"torch==$(python -c 'import torch; print(torch.__version__)')\""  # keeps torch
KID_SUBSETS = 100
KID_SUBSET_SIZE = 1000  # torch-fidelity's default; smaller sets use all their images per subset
SAMPLES = 5000  # samples of a run scored without --n: the count FIDs are usually reported at


def check_dims(dims: int) -> None:
    if dims not in DIMS:
        layers = ", ".join(map(str, DIMS))
        raise IgptError(f"--dims must be one of {layers} (Inception-v3's feature layers), got {dims}")


def check_n(n: int) -> None:
    if n < 2:
        raise IgptError(f"--n must be at least 2 (a covariance needs two images), got {n}")


@dataclass(kw_only=True)
class FidConfig:
    """`igpt fid`'s settings: what is scored against which real split, how, and where the result goes."""

    ckpt: str | None = option(None, "run folder: its samples are scored, or it names the data and size")
    images: str | None = option(None, "score these instead of sampling: a folder of images or an .npy of uint8 "
                                "(N, H, W, 3)", metavar="X")
    n: int | None = option(None, f"images on each side (default: {SAMPLES} samples, or every image of --images)")
    split: str = split_option("the real split compared with")
    dims: int = option(2048, f"Inception-v3 features: {' | '.join(map(str, DIMS))}; FIDs at different sizes are "
                             "not comparable")
    batch_size: int = option(100, "images sampled, and fed to Inception, at once", type=positive_int)
    device: str | None = device_option()
    precision: str = precision_option()
    fid_weights: str | None = option(None, f"a local copy of torch-fidelity's {WEIGHTS_FILE} (default: torch "
                                           "hub's cache, downloaded once)", metavar="PATH")
    seed: int = seed_option("sampling, the real subset and KID's subsets")
    json: str = option("fid.json", "where the result goes")

    def check(self, data_given: dict) -> Path:
        """Refuse what cannot work before any model, data or network loads; `data_given`: the DataConfig
        fields given on the command line. Returns the result's path."""
        check_dims(self.dims)
        if self.n is not None:
            check_n(self.n)
        out = check_folder(self.json)
        if out.suffix.lower() != ".json":
            raise IgptError(f"--json {out} must name a .json file")
        if self.ckpt is None and self.images is None:
            raise IgptError("give --ckpt RUN to score its samples, or --images X (with --ckpt RUN or --data) to "
                            "score those")
        if self.ckpt is None and not {"name", "resolution"} <= set(data_given):
            raise IgptError("--images without --ckpt needs --data and --resolution: the real images to compare with")
        return out


def weights_dir() -> Path:
    """Where torch-fidelity looks for its weights: torch hub's cache ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _put_weights() -> str:
    return f"put {WEIGHTS_FILE} (from {WEIGHTS_URL}) into {weights_dir()}, or pass --fid-weights PATH"


def missing_packages() -> str | None:
    """Why the standard network cannot be built here (torchmetrics or torch-fidelity missing or broken), or None."""
    for module in ("torchmetrics", "torch_fidelity"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name not in (module, None):
                return _broken(err)
            return f"FID and KID need torchmetrics and torch-fidelity: {INSTALL}"
        except Exception as err:  # both import torchvision when it is installed, and a mismatched build raises anything
            return _broken(err)
    return None


def unavailable() -> str | None:
    """Why FID cannot run here without a download (None when it can): `igpt demo` scores its samples
    only when everything is already in place, and otherwise says this in its report."""
    missing = missing_packages()
    if missing:
        return missing
    if not (weights_dir() / WEIGHTS_FILE).is_file():
        return f"the Inception-v3 weights are not on this machine: {_put_weights()}"
    return None


def _broken(err: BaseException) -> str:
    return (f"FID and KID need torchmetrics and torch-fidelity's Inception-v3, which do not import here "
            f"({_first_line(err)}): install {matching_torchvision()}, the one built for torch {torch.__version__}"
            f"{' (from PyTorch CPU index, as this torch is a CPU build)' if '+cpu' in torch.__version__ else ''}")


def matching_torchvision() -> str:
    """The torchvision release made for this torch: each torch 2.N pairs with torchvision 0.(N + 15)."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return f"torchvision 0.{minor + 15}.*" if major == 2 else "the torchvision release made for this torch"


def inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The Inception weights file: `path` if given, else torch hub's cached copy, downloaded there if missing."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise IgptError(f"--fid-weights {path} is not a file: give the downloaded {WEIGHTS_FILE}")
        return path
    folder = weights_dir()
    cached = folder / WEIGHTS_FILE
    if cached.is_file():
        return cached
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), progress=True)
    except Exception as err:  # URLError, HTTPError, OSError, timeouts: all mean the same to the user
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise IgptError(f"the Inception-v3 weights {WEIGHTS_FILE} are not in {folder} and cannot be downloaded "
                        f"({_first_line(err)}): {_put_weights()}") from None
    return cached


def inception(dims: int = 2048, weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """The standard FID network, returning its `dims`-wide features: torchmetrics' `NoTrainInceptionV3`.

    Every missing piece (the packages, the weights offline) is one IgptError line; build it before
    any sampling, so a long run never ends in one.
    """
    check_dims(dims)
    missing = missing_packages()
    if missing:
        have_weights = weights is not None or (weights_dir() / WEIGHTS_FILE).is_file()
        raise IgptError(missing if have_weights else f"{missing}; offline, also {_put_weights()}")
    path = inception_weights(weights)
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        return NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(dims)],
                                  feature_extractor_weights_path=str(path), antialias=False)
    except Exception as err:  # torch.load and load_state_dict raise many types for a wrong or damaged file
        raise IgptError(f"{path} does not hold torch-fidelity's Inception-v3 weights ({_first_line(err)}): "
                        f"{_put_weights()}") from None


@torch.no_grad()
def features(extractor: torch.nn.Module, images: np.ndarray, *, batch_size: int = 100,
             device: str | torch.device = "cpu") -> torch.Tensor:
    """float64 features (N, d) on `device` of uint8 images (N, H, W, 3), `batch_size` images at a time."""
    extractor = extractor.to(device).eval()
    chunks = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.array(images[start : start + batch_size], dtype=np.uint8))  # a writable copy
        chunks.append(extractor(batch.to(device).permute(0, 3, 1, 2).contiguous()).double().flatten(1))
    return torch.cat(chunks)


class _Extracted(torch.nn.Module):
    """torchmetrics' feature stage for features already extracted, so both metrics share one pass of the network."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def scores(real: torch.Tensor, fake: torch.Tensor, *, kid_subsets: int = KID_SUBSETS,
           kid_subset_size: int | None = None, seed: int = 0) -> dict:
    """FID and KID (mean and standard deviation over subsets) between two sets of features (N, d).

    KID draws `kid_subsets` random subsets of `kid_subset_size` features from each side
    (default: 1000, or every image of the smaller set when it has fewer: torchmetrics needs the
    subset to fit), seeded by `seed`.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    n = min(len(real), len(fake))
    check_n(n)
    subset_size = min(KID_SUBSET_SIZE, n) if kid_subset_size is None else kid_subset_size
    if not 1 < subset_size <= n:
        raise IgptError(f"KID's subset size must lie in [2, {n}] for {n} images, got {subset_size}")
    real, fake = real.double(), fake.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # KID's note that it keeps every feature in memory
        fid = FrechetInceptionDistance(feature=_Extracted(real.shape[1])).to(real.device)
        kid = KernelInceptionDistance(feature=_Extracted(real.shape[1]), subsets=kid_subsets,
                                      subset_size=subset_size).to(real.device)
    for metric in (fid, kid):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "kid_subsets": kid_subsets, "kid_subset_size": subset_size}


def score_images(real: np.ndarray, fake: np.ndarray, extractor: torch.nn.Module, *, batch_size: int = 100,
                 device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """FID and KID between uint8 image sets (N, R, R, 3) preprocessed alike (see the module's docstring)."""
    check_n(min(len(real), len(fake)))
    real_features = features(extractor, real, batch_size=batch_size, device=device)
    fake_features = features(extractor, fake, batch_size=batch_size, device=device)
    return scores(real_features, fake_features, seed=seed)


def subset(images: np.ndarray, n: int, seed: int, what: str) -> np.ndarray:
    """`n` of `images`, a seeded choice in their order (all of them when n equals their number)."""
    check_n(n)
    if n > len(images):
        raise IgptError(f"--n {n} is more than {what} has ({len(images):,} images)")
    if n == len(images):
        return np.asarray(images)
    rows = np.sort(np.random.default_rng(seed).choice(len(images), n, replace=False))
    return np.asarray(images[rows])


def real_images(data, split: str, n: int, seed: int = 0) -> np.ndarray:
    """`n` images of `split` read as training data are (a `DataConfig` at the model's resolution)."""
    images = data.images(split)
    return subset(images.images, n, seed, f"{images.name} {split}")


def sampled_images(model, palette, n: int, *, batch_size: int | None = None, seed: int = 0,
                   precision: str = "auto") -> np.ndarray:
    """`n` samples at temperature 1 (the paper's setting), decoded to uint8 (N, R, R, 3)."""
    from igpt.sample import sample

    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    with autocast(device, precision):
        tokens = sample(model, n, generator=generator, batch_size=batch_size)
    return palette.decode(tokens.cpu().numpy())


def score_samples(model, palette, data, extractor: torch.nn.Module, *, n: int = 5000, split: str = "test",
                  batch_size: int = 100, seed: int = 0, run: str | None = None, precision: str = "auto") -> dict:
    """FID and KID of `n` samples of an ar model (from `run`, for the record) against `n` images of `split`
    (`data`: a DataConfig at the model's resolution). The real images are read first, so a split too small
    fails before any sampling."""
    real = real_images(data, split, n, seed)
    fake = sampled_images(model, palette, n, batch_size=batch_size, seed=seed, precision=precision)
    device = next(model.parameters()).device
    result = score_images(real, fake, extractor, batch_size=batch_size, device=device, seed=seed)
    return {**result, "n": n, "split": split, "data": data.name, "resolution": data.resolution, "seed": seed,
            "sampled": True, "source": f"samples of {run}" if run else "samples", "skipped": 0}


def score_files(path: str | os.PathLike, data, extractor: torch.nn.Module, *, n: int | None = None,
                split: str = "test", batch_size: int = 100, device: str | torch.device = "cpu", seed: int = 0) -> dict:
    """FID and KID of a folder or `.npy` of images (`n` of them, default all) against as many of `split`,
    both at `data`'s resolution (crop and --skip-bad as `data` says)."""
    given, skipped = image_set(path, data.resolution, crop=data.crop, skip_bad=data.skip_bad)
    n = n or len(given)
    fake = subset(given, n, seed, f"--images {path}")
    real = real_images(data, split, n, seed)
    result = score_images(real, fake, extractor, batch_size=batch_size, device=device, seed=seed)
    return {**result, "n": n, "split": split, "data": data.name, "resolution": data.resolution, "seed": seed,
            "sampled": False, "source": str(path), "skipped": skipped}


def score(cfg: FidConfig, data, model=None, palette=None) -> dict:
    """What `igpt fid` measures: FID and KID of `model`'s samples (or, with `cfg.images`, of those images) against
    `data`'s `cfg.split`. The Inception network loads first: the offline check, before any data or sampling work."""
    extractor = inception(cfg.dims, cfg.fid_weights)
    if cfg.images is None:
        result = score_samples(model, palette, data, extractor, n=cfg.n or SAMPLES, split=cfg.split,
                               batch_size=cfg.batch_size, seed=cfg.seed, run=cfg.ckpt, precision=cfg.precision)
    else:
        result = score_files(cfg.images, data, extractor, n=cfg.n, split=cfg.split, batch_size=cfg.batch_size,
                             device=resolve_device(cfg.device), seed=cfg.seed)
    return {**result, "dims": cfg.dims}


def summary(result: dict) -> str:
    """One line: FID, KID and what was compared with what."""
    r = result["resolution"]
    source = f"{result['n']:,} " + (result["source"] if result["sampled"] else f"images of {result['source']}")
    layer = f", {result['dims']}-dimensional Inception features" if "dims" in result else ""
    skipped = f" ({result['skipped']} unreadable files skipped)" if result.get("skipped") else ""
    return (f"FID {result['fid']:.3f}, KID {result['kid_mean']:.5f} ± {result['kid_std']:.5f}: {source} against "
            f"{result['data']} {result['split']} at {r}x{r}{layer}, KID over {result['kid_subsets']} subsets of "
            f"{result['kid_subset_size']:,} images{skipped}")


def image_set(path: str | os.PathLike, resolution: int, *, crop: bool = False,
              skip_bad: bool = False) -> tuple[np.ndarray, int]:
    """uint8 (N, R, R, 3) from a folder of images (every file in it, recursively) or an `.npy` of
    (N, H, W, 3) uint8, fitted to `resolution` as training data are; also how many files were skipped."""
    path = Path(path)
    if path.suffix.lower() == ".npy" and path.is_file():
        return np.stack([fit_to(image, resolution, crop) for image in _npy_images(path)]), 0
    if not path.is_dir():
        raise IgptError(f"--images {path}: give a folder of images or an .npy of uint8 images (N, H, W, 3)")
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise IgptError(f"--images {path} holds no readable images")
    images, skipped = read_images(files, resolution, crop=crop, skip_bad=skip_bad)
    return images, len(skipped)


def _npy_images(path: Path) -> np.ndarray:
    try:
        images = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise IgptError(f"cannot read {path}: {_first_line(err)}") from None
    channels_ok = images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3, 4))
    if images.dtype != np.uint8 or not channels_ok:
        raise IgptError(f"{path} holds {images.dtype} {tuple(images.shape)}: give uint8 images (N, H, W, 3)")
    return images
