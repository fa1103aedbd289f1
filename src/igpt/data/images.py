"""Turning whatever image a user has into RGB uint8 at the input resolution."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from igpt.errors import IgptError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
Image.MAX_IMAGE_PIXELS = 20_000 * 20_000  # huge but finite: larger files are refused, not decoded


def to_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8. 16- and 32-bit modes are scaled, not clipped; alpha is dropped."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        gray = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if mode == "P":
        image = image.convert("RGBA")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode(source: bytes | str | Path, name: str, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes or a file into RGB uint8; a bad file raises IgptError naming it.

    `max_pixels` refuses a larger picture from its header, before its pixels are decoded
    (a server's guard: a small file can hold a picture that needs gigabytes).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            handle = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
            with handle, Image.open(handle) as image:
                if max_pixels is not None and image.width * image.height > max_pixels:
                    raise IgptError(f"image {name} is {image.width}x{image.height} pixels, more than the "
                                    f"{max_pixels:,} this accepts")
                image.load()
                array = to_rgb(image)
    except UnidentifiedImageError:  # Pillow's own message names its file handle, not the file
        raise IgptError(f"cannot read image {name}: not an image file Pillow can decode") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise IgptError(f"cannot read image {name}: {err}") from None
    if array.shape[0] < 1 or array.shape[1] < 1:
        raise IgptError(f"cannot read image {name}: it is empty")
    return array


def fit_to(array: np.ndarray, resolution: int | None, crop: bool) -> np.ndarray:
    """Centre-crop to square (optional), then resize to resolution x resolution (box filter when shrinking)."""
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    elif array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    elif array.shape[-1] == 4:
        array = array[..., :3]
    h, w = array.shape[:2]
    if crop and h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        array = array[top : top + side, left : left + side]
        h = w = side
    if resolution is None or (h == resolution and w == resolution):
        return np.ascontiguousarray(array, dtype=np.uint8)
    shrinking = resolution <= min(h, w)
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8))
    return np.asarray(image.resize((resolution, resolution), Image.BOX if shrinking else Image.BICUBIC))


def read_images(paths: list[str | Path], resolution: int, *, crop: bool = True,
                skip_bad: bool = False) -> tuple[np.ndarray, list[str]]:
    """A user's own pictures as the model sees them: (N, R, R, 3) uint8 and the names of the files skipped.

    Any size and mode: each is centre-cropped to square (unless `crop` is off) and resized with
    the same `fit_to` as the training data. A missing or unreadable file stops with one line
    naming it, unless `skip_bad`, which skips it (the caller reports the count); all of them
    bad is an error.
    """
    images, skipped = [], []
    for path in paths:
        try:
            if not Path(path).is_file():
                raise IgptError(f"cannot read image {path}: no such file")
            images.append(fit_to(decode(Path(path), str(path)), resolution, crop=crop))
        except IgptError as err:
            if not skip_bad:
                raise IgptError(f"{err} (pass --skip-bad to skip unreadable files)") from None
            skipped.append(str(path))
    if not images:
        raise IgptError(f"none of the {len(paths)} image files could be read ({', '.join(skipped[:3])}"
                        f"{', ...' if len(skipped) > 3 else ''})")
    return np.stack(images), skipped
