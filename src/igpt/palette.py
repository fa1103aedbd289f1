"""The colour palette: pixels <-> tokens (docs/reference.md §2).

A palette is K colour centres in [-1, 1]^3. A pixel's token is the index of its nearest
centre in squared Euclidean distance, ties going to the lower index. Encoding goes
through a lookup table over the 2^24 possible 8-bit colours, filled lazily with exact
nearest-centre answers, so a data set costs one gather per pixel once its colours are known.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from igpt.config import device_option, option, positive_int, seed_option
from igpt.errors import IgptError
from igpt.fileio import atomic_write, atomic_write_json

HF_CONFIG_NAME = "preprocessor_config.json"
PALETTE_NAME = "palette.npy"
OPENAI = "openai"  # the name that stands for the released palette, shipped in igpt/palettes/
MAX_SIZE = 65535  # tokens are stored as uint16; 65535 marks "not yet computed" in the lookup table
_UNSET = np.uint16(MAX_SIZE)
_CHUNK_PIXELS = 1 << 22  # pixels encoded per step: bounds the temporary arrays to a few tens of MB
_CHUNK_BYTES = 2 << 20  # k-means distance-matrix bytes per step: small enough to stay in cache
_EXACT_CHUNK_BYTES = 32 << 20  # exact search: big enough that per-call overhead vanishes
FIT_PIXELS = 2_000_000  # pixels a fit samples by default
CLUSTERS = 512  # a fitted palette's size by default: the released palette's


@dataclass(kw_only=True)
class PaletteFitConfig:
    """`igpt palette fit`'s settings."""

    out: str = option(help="output .npy (or preprocessor_config.json for Hugging Face)")
    clusters: int = option(CLUSTERS, "palette size")
    max_pixels: int = option(FIT_PIXELS, "pixels sampled", type=positive_int)
    seed: int = seed_option("seed of the pixel sample and of k-means")
    device: str | None = device_option()


def colour_codes(pixels: np.ndarray, rgb: bool) -> np.ndarray:
    """Pack uint8 pixels into 24-bit integers r<<16 | g<<8 | b (grayscale repeats the level)."""
    if rgb:
        flat = pixels.reshape(-1, 3).astype(np.int32)
        return (flat[:, 0] << 16) | (flat[:, 1] << 8) | flat[:, 2]
    return pixels.reshape(-1).astype(np.int32) * 0x010101


def _is_rgb(images: np.ndarray) -> bool:
    """(N, H, W, 3) and (P, 3) hold RGB; (N, H, W) holds grayscale."""
    if images.ndim == 4 and images.shape[-1] == 3 or images.ndim == 2 and images.shape[-1] == 3:
        return True
    if images.ndim == 3:
        return False
    raise IgptError(f"expected (N, H, W, 3) RGB or (N, H, W) grayscale uint8 images, got shape {images.shape}")


def _codes_to_unit(codes: np.ndarray, dtype=np.float64) -> np.ndarray:
    """24-bit colour codes -> (n, 3) coordinates in [-1, 1], exactly x / 127.5 - 1."""
    rgb = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], axis=1)
    return rgb.astype(dtype) / 127.5 - 1.0


def nearest_exact(points: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Index of the nearest centre for each point, float64 squared distances, lowest index on ties.

    Candidates come from the fast expansion |c|^2 - 2 x.c; only rows whose best two
    candidates are within the expansion's rounding error are recomputed term by term.
    """
    x = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float64))
    c = torch.from_numpy(np.ascontiguousarray(centers, dtype=np.float64))
    c2 = (c * c).sum(1)
    out = torch.empty(len(x), dtype=torch.int64)
    step = max(1, _EXACT_CHUNK_BYTES // (8 * len(c)))
    for start in range(0, len(x), step):
        xs = x[start : start + step]
        d = torch.addmm(c2, xs, c.T, alpha=-2.0)
        best = d.argmin(1)
        if len(c) > 1:
            close = (d <= d.gather(1, best[:, None]) + 1e-9).sum(1) > 1
            if close.any():
                rows = close.nonzero().squeeze(1)
                exact = ((xs[rows, None, :] - c[None, :, :]) ** 2).sum(-1)
                best[rows] = exact.argmin(1)
        out[start : start + step] = best
    return out.numpy()


class Palette:
    """K colour centres in [-1, 1]; `encode` maps uint8 images to tokens, `decode` back."""

    def __init__(self, centers: np.ndarray):
        c = np.array(centers, dtype=np.float32)
        if c.ndim != 2 or c.shape[1] != 3 or len(c) == 0:
            raise IgptError(f"a palette is a (K, 3) array of colours, got shape {c.shape}")
        if len(c) > MAX_SIZE:
            raise IgptError(f"a palette holds at most {MAX_SIZE} colours, got {len(c)}")
        if not np.isfinite(c).all() or np.abs(c).max() > 1.0 + 1e-6:
            raise IgptError("palette centres must be finite and within [-1, 1] (pixels are x / 127.5 - 1)")
        c.setflags(write=False)
        self.centers = c
        self._lut: np.ndarray | None = None

    # ---- identity -------------------------------------------------------------------
    @property
    def size(self) -> int:
        return len(self.centers)

    def __len__(self) -> int:
        return len(self.centers)

    @property
    def hash(self) -> str:
        """Short content hash of the centres: names caches and checks checkpoints."""
        return hashlib.sha256(np.ascontiguousarray(self.centers).tobytes()).hexdigest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Palette) and np.array_equal(self.centers, other.centers)

    def __hash__(self) -> int:
        return hash(self.hash)

    def __repr__(self) -> str:
        return f"Palette(size={self.size}, hash={self.hash})"

    @property
    def colors(self) -> np.ndarray:
        """The centres as uint8 RGB: rint(127.5 * (c + 1)) clipped, as docs/reference.md §2 decodes."""
        return np.clip(np.rint(127.5 * (self.centers.astype(np.float64) + 1.0)), 0, 255).astype(np.uint8)

    # ---- pixels <-> tokens ------------------------------------------------------------
    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 images (N, H, W, 3) or grayscale (N, H, W) -> tokens (N, H*W) as uint16."""
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise IgptError(f"encode takes uint8 images, got {images.dtype}")
        if images.ndim == 2:
            raise IgptError(f"encode takes (N, H, W, 3) or (N, H, W) images, got shape {images.shape}")
        rgb = _is_rgb(images)
        n = images.shape[0]
        flat = images.reshape(n, -1, 3) if rgb else images.reshape(n, -1)
        tokens = np.empty(flat.shape[:2], dtype=np.uint16)
        per_image = max(1, flat.shape[1])
        step = max(1, _CHUNK_PIXELS // per_image)
        for start in range(0, n, step):
            codes = colour_codes(flat[start : start + step], rgb)
            tokens[start : start + step] = self._lookup(codes).reshape(-1, flat.shape[1])
        return tokens

    def _lookup(self, codes: np.ndarray) -> np.ndarray:
        if self._lut is None:
            self._lut = np.full(1 << 24, _UNSET, dtype=np.uint16)
        found = self._lut[codes]
        missing = found == _UNSET
        if missing.any():
            new = np.unique(codes[missing])
            self._lut[new] = nearest_exact(_codes_to_unit(new), self.centers).astype(np.uint16)
            found[missing] = self._lut[codes[missing]]
        return found

    def decode(self, tokens: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
        """Tokens (N, H*W) or (H*W,) -> uint8 images (N, H, W, 3); square unless `shape` is given."""
        tokens = np.asarray(tokens)
        if tokens.ndim == 1:
            tokens = tokens[None]
        if tokens.ndim != 2:
            raise IgptError(f"decode takes tokens (N, H*W), got shape {tokens.shape}")
        if shape is None:
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise IgptError(f"{tokens.shape[1]} tokens per image is not a square; pass shape=(H, W)")
            shape = (side, side)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.size):
            raise IgptError(f"tokens must lie in [0, {self.size}) for this {self.size}-colour palette")
        return self.colors[tokens.astype(np.int64)].reshape(len(tokens), *shape, 3)

    # ---- fitting ----------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        images: np.ndarray,
        clusters: int = CLUSTERS,
        *,
        max_pixels: int = FIT_PIXELS,
        seed: int = 0,
        device: str | torch.device | None = None,
        max_iter: int = 300,
        log: Callable[[str], None] | None = None,
    ) -> "Palette":
        """k-means palette over uint8 pixels (any shape ending in 3, or grayscale).

        Up to `max_pixels` pixels are sampled; k-means then runs on their distinct
        colours weighted by count, which is the same problem with far fewer points.
        With no more distinct colours than `clusters`, the palette is those colours.
        """
        log = log or (lambda _msg: None)
        if clusters < 1 or max_pixels < 1:
            raise IgptError(f"--clusters and --max-pixels must be positive, got {clusters} and {max_pixels}")
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise IgptError(f"a palette is fitted on uint8 pixels, got {images.dtype}")
        codes = colour_codes(images, _is_rgb(images))
        if codes.size == 0:
            raise IgptError("no pixels to fit a palette on: the data set is empty")
        rng = np.random.default_rng(seed)
        if codes.size > max_pixels:
            codes = codes[rng.choice(codes.size, max_pixels, replace=False)]
        colours, counts = np.unique(codes, return_counts=True)
        if len(colours) <= clusters:
            log(f"the data holds {len(colours)} distinct colours (<= {clusters}): the palette keeps just those")
            return cls(_codes_to_unit(colours, np.float32))
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        points = torch.from_numpy(_codes_to_unit(colours)).to(dev)
        weights = torch.from_numpy(counts.astype(np.float64)).to(dev)
        gen = torch.Generator(device=dev).manual_seed(seed)
        centers, inertia, iters = kmeans(points, weights, clusters, generator=gen, max_iter=max_iter)
        log(
            f"k-means: {clusters} colours from {codes.size:,} pixels ({len(colours):,} distinct), "
            f"{iters} iterations, inertia {inertia:.4g}"
        )
        return cls(centers.float().cpu().numpy())

    # ---- files ------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Palette":
        """From a `.npy`, a Hugging Face `preprocessor_config.json`, a folder holding either, or the
        string "openai" for the released palette (a local file of that name is reached as ./openai)."""
        if isinstance(path, str) and path == OPENAI:
            return cls.openai()
        path = Path(path)
        if path.is_dir():
            for name in (PALETTE_NAME, HF_CONFIG_NAME):
                if (path / name).is_file():
                    return cls.load(path / name)
            raise IgptError(f"{path} holds neither {PALETTE_NAME} nor {HF_CONFIG_NAME}: point at a palette file")
        if not path.is_file():
            raise IgptError(f"palette not found: {path}")
        if path.suffix == ".json":
            try:
                config = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                raise IgptError(f"{path} is not readable JSON ({err})") from None
            if not isinstance(config, dict) or "clusters" not in config:
                raise IgptError(f"{path} has no 'clusters' list: not an ImageGPT preprocessor config")
            return cls(np.asarray(config["clusters"], dtype=np.float32))
        try:
            centers = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise IgptError(f"{path} is not a readable .npy palette ({err})") from None
        return cls(centers)

    def save(self, path: str | os.PathLike, resolution: int | None = None) -> Path:
        """Write a `.npy` (the released format), or a Hugging Face config when `path` ends in .json."""
        path = Path(path)
        if path.suffix == ".json":
            return self.save_hf(path.parent, resolution or 32, name=path.name)
        if path.suffix != ".npy":
            raise IgptError(f"palette files end in .npy or .json, got {path.name}")
        atomic_write(path, lambda f: np.save(f, self.centers))
        return path

    def to_hf_config(self, resolution: int) -> dict:
        """The `ImageGPTImageProcessor` configuration carrying this palette."""
        return {
            "image_processor_type": "ImageGPTImageProcessor",
            "clusters": self.centers.tolist(),
            "do_color_quantize": True,
            "do_normalize": True,
            "do_resize": True,
            "resample": 2,
            "size": {"height": resolution, "width": resolution},
        }

    def save_hf(self, directory: str | os.PathLike, resolution: int, name: str = HF_CONFIG_NAME) -> Path:
        path = Path(directory) / name
        return atomic_write_json(path, self.to_hf_config(resolution))

    @classmethod
    def openai(cls) -> "Palette":
        """The released 512-colour ImageNet palette, shipped inside the package so it needs no network."""
        with resources.files("igpt").joinpath(f"palettes/{OPENAI}.npz").open("rb") as f, np.load(f) as stored:
            return cls(stored["centers"])


# ---- k-means ------------------------------------------------------------------------------
_SLACK = 4e-6  # squared-distance rounding of float32 expansions, absorbed into the bounds
_GROUP = 16  # centres per group of lower bounds


def kmeans(
    points: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    *,
    generator: torch.Generator,
    max_iter: int = 300,
    init_points: int = 65536,
) -> tuple[torch.Tensor, float, int]:
    """Weighted k-means: greedy k-means++ seeding, then Lloyd iterations until no point moves.

    Lloyd keeps, per point, an upper bound on the distance to its centre and a lower
    bound on the distance to each group of other centres (Yinyang k-means' global
    filter): when centres drift, a bound only loosens by its own group's largest move,
    so each iteration recomputes distances only for the few points near a boundary.
    Distances are float32 with the bounds widened by their rounding error; centres are
    averaged in float64. Seeding runs on a weighted sample of `init_points` points.
    Returns (centres, inertia, iterations).
    """
    points = points.float()
    weights = weights.double()
    weighted = points.double() * weights[:, None]
    seed_idx = torch.multinomial(weights, min(init_points, len(points)), replacement=True, generator=generator)
    seed_idx, seed_weight = seed_idx.unique(return_counts=True)
    centers = _kmeans_pp(points[seed_idx], seed_weight.float(), k, generator)
    centers = centers[_spatial_order(centers)]
    n_groups = max(1, k // _GROUP)
    padded = -(-k // n_groups) * n_groups
    # Far-away dummy centres fill the last group so groups are equal blocks; no point ever joins them.
    centers = torch.cat([centers, centers.new_full((padded - k, centers.shape[1]), 1e3)])
    assign, upper, lower = _nearest_two(points, centers, n_groups)
    iters = 0
    for iters in range(1, max_iter + 1):
        new_centers = _weighted_means(weighted, weights, assign, centers)
        shift = (new_centers - centers).norm(dim=1)
        centers = new_centers
        upper += shift[assign]
        lower -= shift.view(n_groups, -1).amax(1)[:, None]
        gap = torch.cdist(centers, centers)
        gap.fill_diagonal_(float("inf"))
        bound = torch.maximum(gap.amin(1)[assign] / 2, lower.amin(0))
        suspect = (upper > bound).nonzero().squeeze(1)
        if len(suspect):
            upper[suspect] = (points[suspect] - centers[assign[suspect]]).norm(dim=1)
            suspect = suspect[upper[suspect] > bound[suspect]]
        moved = 0
        if len(suspect):
            a, u, lo = _nearest_two(points[suspect], centers, n_groups)
            moved = int((a != assign[suspect]).sum())
            assign[suspect], upper[suspect], lower[:, suspect] = a, u, lo
        if moved == 0:
            break
    residual = (points.double() - centers.double()[assign]) ** 2
    return centers[:k], float((weights * residual.sum(1)).sum()), iters


def _spatial_order(centers: torch.Tensor) -> torch.Tensor:
    """An order that keeps nearby centres together (Morton code on an 8-level grid)."""
    cells = ((centers.clamp(-1, 1) + 1) * 3.999).long()
    code = torch.zeros(len(centers), dtype=torch.long, device=centers.device)
    for bit in range(3):
        for axis in range(centers.shape[1]):
            code |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
    return code.argsort()


def _kmeans_pp(points: torch.Tensor, weights: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++: each new centre is the best of 2 + log k draws proportional to w * D^2."""
    n = len(points)
    trials = 2 + int(math.log(k))
    first = torch.multinomial(weights / weights.sum(), 1, generator=generator)
    centers = points.new_empty(k, points.shape[1])
    centers[0] = points[first[0]]
    norms = (points * points).sum(1)
    closest = ((points - centers[0]) ** 2).sum(1)
    for i in range(1, k):
        mass = torch.cumsum((weights * closest).double(), 0)
        draws = torch.rand(trials, generator=generator, device=points.device, dtype=mass.dtype) * mass[-1]
        candidates = torch.searchsorted(mass, draws).clamp_(max=n - 1)
        picked = points[candidates]
        dist = torch.addmm(norms[:, None], points, picked.T, alpha=-2.0).add_((picked * picked).sum(1)).clamp_(min=0)
        merged = torch.minimum(closest[:, None], dist)
        best = (weights @ merged).argmin()
        closest = merged[:, best]
        centers[i] = points[candidates[best]]
    return centers


def _nearest_two(
    points: torch.Tensor, centers: torch.Tensor, n_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nearest centre, distance to it, and per group of centres a lower bound on the distance to the others.

    Distances are laid out (centres, points) so every reduction runs across rows, which vectorises.
    """
    c2 = (centers * centers).sum(1, keepdim=True)
    step = max(1, _CHUNK_BYTES // (4 * len(centers)))
    assign = torch.empty(len(points), dtype=torch.int64, device=points.device)
    lower = torch.empty(n_groups, len(points), dtype=points.dtype, device=points.device)
    for start in range(0, len(points), step):
        x = points[start : start + step]
        d = torch.addmm(c2, centers, x.T, alpha=-2.0).view(n_groups, -1, len(x))
        per_group = d.amin(1)
        group = per_group.argmin(0)
        cols = torch.arange(len(x), device=x.device)
        inside = d[group, :, cols]  # (points, group size): distances within each point's best group
        best_in = inside.argmin(1)
        inside[cols, best_in] = float("inf")
        per_group[group, cols] = inside.amin(1)
        assign[start : start + step] = group * d.shape[1] + best_in
        lower[:, start : start + step] = per_group.add_((x * x).sum(1)).sub_(_SLACK).clamp_(min=0).sqrt_()
    upper = (points - centers[assign]).norm(dim=1)
    return assign, upper, lower


def _weighted_means(weighted, weights, assign, previous):
    """Cluster means from float64 weighted points; an emptied cluster keeps its previous centre."""
    k = len(previous)
    mass = torch.zeros(k, dtype=torch.float64, device=weights.device).index_add_(0, assign, weights)
    sums = torch.zeros(k, weighted.shape[1], dtype=torch.float64, device=weights.device).index_add_(0, assign, weighted)
    means = (sums / mass.clamp(min=1e-300)[:, None]).to(previous.dtype)
    return torch.where(mass[:, None] > 0, means, previous)
