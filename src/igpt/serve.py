"""`igpt serve`: a local page where people pick, upload or draw a picture, hide its bottom rows and
watch the model complete it, beside the picture's surprise map.

Gradio (the `app` extra, imported only by the page's functions) draws the page and runs its
queue: model work leaves the request threads, runs one event at a time, and each waiting user
sees their place. What needs no browser is kept apart and tested on its own: `ModelWorker`
(completions streamed row by row from `sample`'s `watch`, per-pixel bits), `model_facts`,
`read_upload` and `read_drawing` (every bad input becomes one IgptError line that the page
shows). `serve` runs the page until Ctrl-C or SIGTERM in a temporary folder removed at exit.
"""

from __future__ import annotations

import contextlib
import html
import importlib.util
import ipaddress
import json
import math
import os
import queue
import secrets
import shutil
import signal
import tempfile
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from igpt.animation import Animation
from igpt.config import device_option, option, positive_int
from igpt.errors import IgptError
from igpt.grids import save_grid
from igpt.precision import precision_option

INSTALL = "pip install 'igpt[app]'"
MAX_UPLOAD_MB = 20.0
MAX_UPLOAD_PIXELS = 50_000_000  # 150 MB once decoded: larger pictures are refused from their header
MAX_COMPLETIONS = 8
GALLERY_SIZE = 16
PREVIEW_PIXELS = 256  # the chosen picture and the drawing canvas are shown about this wide
EVAL_FILES = ("eval.json", "test.json")  # where `igpt eval --json` results are looked for in the run folder
BERT_CANNOT_COMPLETE = ("this model was trained with the bert objective: it predicts hidden pixels from all the "
                        "others, not the next pixel from those before it, so it cannot complete a picture from its "
                        "top rows. Its surprise map works.")


@dataclass(kw_only=True)
class ServeConfig:
    """`igpt serve`'s settings: `serve`'s arguments (the data's are DataConfig's)."""

    ckpt: str = option(help="run folder (or a converted model folder)")
    host: str = option("127.0.0.1", "address to serve on: 127.0.0.1 is this machine only, 0.0.0.0 serves other "
                                    "machines too")
    port: int = option(7860, "port to serve on", type=positive_int)
    device: str | None = device_option()
    precision: str = precision_option()
    max_upload_mb: float = option(MAX_UPLOAD_MB, "largest image file the page accepts")


def require_gradio() -> None:
    """Fail in one line, before the model loads, where the `app` extra is not installed."""
    try:
        found = importlib.util.find_spec("gradio") is not None
    except (ImportError, ValueError):  # a broken install, or one hidden from this process
        found = False
    if not found:
        raise IgptError(f"igpt serve needs Gradio, which igpt does not install by default: {INSTALL}")


# ---- the model's work ----------------------------------------------------------------------------
class _Stopped(Exception):
    """Raised inside sample()'s watch to end a completion nobody is waiting for."""


@dataclass
class Frame:
    """A completion grid as decoded so far: the input with its hidden rows grey, the completions, the original."""

    grid: np.ndarray  # uint8 (H, W, 3), the completions drawn as far as `filled_rows`
    filled_rows: int  # image rows known in every completion, the kept ones included
    rows: np.ndarray | None = None  # at the end only: the images of the grid, (samples + 2, R, R, 3)


class _RowStream(Animation):
    """The filling-in animation with a frame per row, each handed to `out` as it is drawn; it ends the
    sampling (raising _Stopped from the decoding loop) once `stop` is set."""

    def __init__(self, *args, out: queue.Queue, stops: tuple[threading.Event, ...], **options):
        super().__init__(*args, **options)
        self.out, self.stops = out, stops

    def watch(self, first: int, tokens: torch.Tensor, filled: int) -> None:
        if any(stop.is_set() for stop in self.stops):
            raise _Stopped
        drawn = len(self.frames)
        super().watch(first, tokens, filled)
        if len(self.frames) > drawn and filled < self.tokens.shape[1]:  # the finished grid comes with its rows
            self.out.put(Frame(self.frames[-1], filled // self.side))


class ModelWorker:
    """The one model behind the page: completions streamed row by row, and per-pixel bits.

    One piece of model work runs at a time (a lock: Gradio's queue already sends them one by
    one, and library callers are kept as safe). `close` ends any completion within a row.
    """

    def __init__(self, model, palette, precision: str = "auto"):
        from igpt.precision import resolve_precision

        self.model, self.palette = model.eval(), palette
        self.side = model.config.side
        self.device = next(model.parameters()).device
        self.precision = resolve_precision(precision, self.device)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        palette.encode(palette.colors[None, None])  # makes the palette's lookup table before threads share it

    @property
    def can_complete(self) -> bool:
        return self.model.config.objective == "ar"

    def seen(self, image: np.ndarray) -> np.ndarray:
        """The picture in the palette's colours: what the model is given."""
        return self.palette.decode(self.palette.encode(image[None]))[0]

    def complete(self, image: np.ndarray, keep_rows: int, samples: int, *, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> Iterator[Frame]:
        """`samples` completions of `image` (R, R, 3) below its top `keep_rows` rows: a Frame once the kept
        rows are in and after every sampled row, the last one with the finished images.

        Sampling runs on a thread of its own, so each row reaches the caller as soon as it is
        decoded. Closing the iterator (a user's stop) ends the sampling within a row and returns
        once it has ended, so the model is free again.
        """
        from igpt.precision import autocast
        from igpt.grids import image_grid
        from igpt.sample import completion_rows, filter_logits

        if not self.can_complete:
            raise IgptError(BERT_CANNOT_COMPLETE)
        side = self.side
        if not 0 <= keep_rows <= side:
            raise IgptError(f"the rows to keep must lie in [0, {side}] for {side}x{side} pictures, got {keep_rows}")
        if not 1 <= samples <= MAX_COMPLETIONS:
            raise IgptError(f"the number of completions must lie in [1, {MAX_COMPLETIONS}], got {samples}")
        filter_logits(torch.zeros(1, 2), temperature, top_k, top_p)  # bad options fail here, not on the thread
        originals = image[None]
        frames: queue.Queue = queue.Queue()
        stop = threading.Event()
        stream = _RowStream.of_completions(self.palette, originals, keep_rows, samples, every_rows=1, out=frames,
                                           stops=(stop, self._closed))

        def run() -> None:
            try:
                with self._lock:
                    generator = torch.Generator(device=self.device).manual_seed(seed)
                    with autocast(self.device, self.precision):
                        rows = completion_rows(self.model, self.palette, originals, keep_rows, samples,
                                               watch=stream.watch, temperature=temperature, top_k=top_k,
                                               top_p=top_p, generator=generator)[0]
                frames.put(Frame(image_grid(rows, samples + 2), side, rows))
            except _Stopped:
                frames.put(None)
            except BaseException as err:  # handed to the caller's thread, raised there
                frames.put(err)

        thread = threading.Thread(target=run, name="igpt-serve-completion", daemon=True)
        thread.start()
        try:
            while True:
                item = frames.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.rows is not None:
                    return
        finally:
            stop.set()
            thread.join()

    def pixel_bits(self, image: np.ndarray) -> np.ndarray:
        """Each pixel's bits (R, R) under the model: the surprise map's numbers (evaluate.pixel_bits)."""
        from igpt.evaluate import pixel_bits

        tokens = torch.from_numpy(self.palette.encode(image[None]).astype(np.int64))
        with self._lock:
            return pixel_bits(self.model, tokens, precision=self.precision)[0].numpy()

    def close(self) -> None:
        """The server is stopping: end any completion within a row."""
        self._closed.set()


def surprise_picture(image: np.ndarray, bits: np.ndarray, name: str, folder: Path) -> np.ndarray:
    """The picture beside its per-pixel bits, drawn by plots.surprise_maps, as an RGB array."""
    from PIL import Image

    from igpt.plots import surprise_maps

    path = surprise_maps(image[None], bits[None], [name], folder / f"surprise-{uuid.uuid4().hex}.png")
    try:
        with Image.open(path) as drawn:
            return np.asarray(drawn.convert("RGB"))
    finally:
        path.unlink(missing_ok=True)


# ---- what users give -----------------------------------------------------------------------------
def read_upload(path: str | os.PathLike, side: int, max_bytes: int) -> tuple[np.ndarray, str]:
    """An uploaded file as the model sees it (centre-cropped and resized as the training data) and its
    name; too large a file, or a picture of too many pixels, is refused before it is decoded."""
    from igpt.data.images import decode, fit_to

    path = Path(path)
    size = path.stat().st_size
    if size > max_bytes:
        raise IgptError(f"{path.name} is {_size(size)}, more than the {_size(max_bytes)} this page accepts")
    return fit_to(decode(path, path.name, max_pixels=MAX_UPLOAD_PIXELS), side, crop=True), path.name


def _size(n: int) -> str:
    return f"{n / 2**20:.3g} MB" if n >= 2**20 else f"{n / 2**10:.3g} KB"


def read_drawing(value: dict | None, side: int) -> np.ndarray:
    """The canvas (Gradio's editor value: its composite, flattened on white) at the model's resolution."""
    from igpt.data.images import fit_to

    composite = None if value is None else value.get("composite")
    if composite is None:
        raise IgptError("the canvas is empty: draw something first")
    composite = np.asarray(composite)
    if composite.dtype != np.uint8 or composite.ndim not in (2, 3) or min(composite.shape[:2]) < 1:
        raise IgptError("the canvas sent no picture: draw something first")
    return fit_to(composite, side, crop=True)


def enlarged(image: np.ndarray, pixels: int = PREVIEW_PIXELS) -> np.ndarray:
    """A small picture enlarged by whole pixels, so it stays sharp wherever it is shown."""
    from igpt.grids import image_grid

    return image_grid(image[None], columns=1, scale=max(1, pixels // max(image.shape[:2])), pad=0)


def cut_preview(seen: np.ndarray, keep_rows: int) -> np.ndarray:
    """The picture enlarged with the hidden rows faded and a red line at the cut: what a completion keeps."""
    from igpt.grids import UNKNOWN

    big = enlarged(seen).astype(np.float32)
    cut = keep_rows * (len(big) // len(seen))
    big[cut:] = 0.35 * big[cut:] + 0.65 * UNKNOWN
    big[max(0, cut - 2) : cut + 2] = (220, 30, 30)
    return big.astype(np.uint8)


def canvas_for(palette, side: int) -> tuple[int, np.ndarray, list[str]]:
    """The drawing canvas: its size (a whole number of screen pixels per model pixel), its background
    (the palette's darkest colour) and brush colours (up to 24 of the palette's, light first)."""
    colors = palette.colors
    order = np.argsort(colors.astype(np.float64) @ (0.299, 0.587, 0.114))[::-1]
    picked = order[np.unique(np.linspace(0, len(order) - 1, min(24, len(order))).round().astype(int))]
    size = side * max(1, math.ceil(PREVIEW_PIXELS / side))
    background = np.broadcast_to(colors[order[-1]], (size, size, 3)).copy()
    return size, background, ["#%02x%02x%02x" % tuple(int(v) for v in colors[i]) for i in picked]


# ---- what the page says about the model ----------------------------------------------------------
def attention_text(config) -> str:
    pattern = {"dense": "dense (every earlier pixel)",
               "local": f"local (the {config.window_rows} rows before each pixel)",
               "strided": "strided (a row's worth of pixels before each, and its column)"}[config.attention]
    return f"{pattern}, {config.positions} positions"


def measured_bits(folder: Path) -> tuple[str, str]:
    """(label, value): the bits/pixel of an `igpt eval --json` result kept in the run folder (or the demo's
    eval.json, which measured DEMO/run/best), else "not measured" and how to measure it."""
    candidates = [folder / name for name in EVAL_FILES]
    if folder.name == "best" and folder.parent.name == "run":
        candidates.append(folder.parent.parent / "eval.json")
    for path in candidates:
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(result, dict) and isinstance(result.get("bits_per_pixel"), (int, float)):
            split = result.get("split", "test")
            return f"{split} bits/pixel", f"{result['bits_per_pixel']:.3f} ({path.name})"
    return "test bits/pixel", "not measured (igpt eval --ckpt RUN --json RUN/eval.json measures it)"


def model_facts(worker: ModelWorker, ckpt: str | os.PathLike, data_name: str | None) -> dict[str, str]:
    """The facts the page shows: what the model is, what it was trained on, how well it does."""
    config = worker.model.config
    label, bits = measured_bits(Path(ckpt))
    return {
        "model": str(ckpt),
        "data set": data_name or "not recorded",
        "resolution": f"{worker.side}x{worker.side}",
        "palette": f"{worker.palette.size} colours",
        "layers": str(config.n_layer),
        "width": f"{config.n_embd} ({config.n_head} heads)",
        "attention": attention_text(config),
        "objective": "ar (next pixel)" if worker.can_complete else "bert (masked pixels): cannot complete",
        label: bits,
        "runs on": f"{worker.device}, {worker.precision}",
    }


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Gallery:
    """Test pictures of the run's data set to start from, with a caption each; `note` says why there are none."""

    images: np.ndarray | None = None  # uint8 (N, R, R, 3)
    captions: list[str] | None = None
    note: str = ""


def first_test_pictures(info, config, data: dict | None = None,
                        n: int = GALLERY_SIZE) -> tuple[str | None, Gallery]:
    """The data set's name and its first `n` test pictures; a folder without its data still serves."""
    try:
        described = info.data_for(config, **(data or {}))
        split = described.images("test")
    except IgptError as err:
        name = (data or {}).get("name") or (info.data.name if info.data else None)
        return name, Gallery(note=f"no test pictures ({err}): upload or draw one")
    images = np.asarray(split.images[:n])
    captions = [f"test {i}" for i in range(len(images))]
    if split.labels is not None:
        labels = np.asarray(split.labels[: len(images)])
        captions = [f"{caption} ({split.classes[k] if split.classes else k})" for caption, k in zip(captions, labels)]
    return described.name, Gallery(images, captions)


# ---- the page ------------------------------------------------------------------------------------
CSS = """
.pixels img, .pixels canvas { image-rendering: pixelated; }
#igpt-exposed { border-left: 4px solid #d97706; padding-left: 0.6em; }
"""


def build_app(worker: ModelWorker, facts: dict[str, str], gallery: Gallery, *, folder: Path,
              max_upload_bytes: int = int(MAX_UPLOAD_MB * 2**20), exposed: str | None = None):
    """The page (a gradio.Blocks): every action is also an API endpoint (pick_test, upload, draw, cut,
    surprise, complete), so the tests drive it through gradio_client as a browser would."""
    import gradio as gr

    folder.mkdir(parents=True, exist_ok=True)
    on = _Handlers(worker, gallery, folder, max_upload_bytes)
    with gr.Blocks(title=f"igpt serve: {Path(facts['model']).name}", analytics_enabled=False,
                   delete_cache=(1800, 3600)) as app:
        _header(facts, exposed, worker.can_complete)
        chosen = gr.State(None if gallery.images is None else {"image": gallery.images[0], "name": gallery.captions[0]})
        with gr.Row():
            with gr.Column(scale=3):
                pictures, test_choice, upload, canvas, use_canvas = _picture_tabs(worker, gallery, max_upload_bytes)
            with gr.Column(scale=2):
                preview, keep = _cut_view(worker, gallery)
            with gr.Column(scale=3):
                surprise_map = _surprise_view(worker, gallery, folder)
        with gr.Row():
            options = _sampling_options(worker)
        with gr.Row():
            go = gr.Button("Complete", variant="primary", interactive=worker.can_complete, elem_id="igpt-complete")
            halt = gr.Button("Stop", variant="stop", elem_id="igpt-stop")
        status = gr.Markdown("Choose a picture, set the rows to keep, then press Complete.", label="status",
                             elem_id="igpt-status")
        grid = gr.Image(label="input with the hidden rows grey, the completions, the original", format="png",
                        interactive=False, elem_classes="pixels", elem_id="igpt-grid")
        download = gr.File(label="the grid as a PNG", interactive=False, elem_id="igpt-download")

        model_work = dict(concurrency_id="model", concurrency_limit=1)
        chosen_outputs = [chosen, preview, status]

        def selected(event):
            return event.index

        selected.__annotations__ = {"event": gr.SelectData}  # Gradio hands the click's data to this type
        pictures.select(selected, None, test_choice, api_visibility="private", queue=False)
        test_choice.change(on.pick_test, [test_choice, keep], chosen_outputs, api_name="pick_test").success(
            on.surprise, chosen, surprise_map, api_name="surprise", **model_work)
        upload.upload(on.use_upload, [upload, keep], chosen_outputs, api_name="upload").success(
            on.surprise, chosen, surprise_map, api_visibility="private", **model_work)
        use_canvas.click(on.use_drawing, [canvas, keep], chosen_outputs, api_name="draw").success(
            on.surprise, chosen, surprise_map, api_visibility="private", **model_work)
        keep.change(on.cut, [chosen, keep], preview, api_name="cut", show_progress="hidden")
        completing = go.click(on.complete, [chosen, keep, *options], [grid, status, download], api_name="complete",
                              **model_work)
        halt.click(None, None, None, cancels=[completing], api_visibility="private")
    return app


def _header(facts: dict[str, str], exposed: str | None, can_complete: bool) -> None:
    """The title, the model's facts, and the warnings: served beyond this machine, or unable to complete."""
    import gradio as gr

    gr.Markdown("## Image GPT: hide the bottom of a picture and watch the model complete it")
    gr.Markdown(" · ".join(f"**{key}** {html.escape(value)}" for key, value in facts.items()), elem_id="igpt-facts")
    if exposed:
        gr.Markdown(exposed, elem_id="igpt-exposed")
    if not can_complete:
        gr.Markdown(f"**This model cannot complete pictures.** {BERT_CANNOT_COMPLETE}", elem_id="igpt-bert")


def _picture_tabs(worker: ModelWorker, gallery: Gallery, max_upload_bytes: int) -> tuple:
    """The three ways to choose a picture, a tab each: the run's test pictures, an upload, a drawing.
    Returns the gallery, its dropdown, the upload, the canvas and the canvas's button."""
    import gradio as gr

    side, shown = worker.side, gallery.images is not None
    with gr.Tabs():
        with gr.Tab("Test pictures", id="test"):
            if not shown:
                gr.Markdown(html.escape(gallery.note))
            pictures = gr.Gallery(
                [(enlarged(image, 64), caption) for image, caption in zip(gallery.images, gallery.captions)]
                if shown else None, visible=shown, columns=4, height="auto", allow_preview=False, format="png",
                show_label=False, buttons=[], interactive=False, elem_classes="pixels", elem_id="igpt-gallery")
            test_choice = gr.Dropdown([(caption, i) for i, caption in enumerate(gallery.captions or [])],
                                      value=0 if shown else None, label="test picture", visible=shown)
        with gr.Tab("Upload", id="upload"):
            upload = gr.File(label=f"an image file of any size and mode (up to {_size(max_upload_bytes)}): "
                                   f"centre-cropped and resized to {side}x{side}", elem_id="igpt-upload")
        with gr.Tab("Draw", id="draw"):
            size, background, colours = canvas_for(worker.palette, side)
            gr.Markdown(f"Draw with the mouse: each square of {size // side}x{size // side} screen "
                        "pixels is one of the model's pixels, and the brushes are its palette's colours.")
            canvas = gr.Sketchpad({"background": background, "layers": [], "composite": None},
                                  canvas_size=(size, size), fixed_canvas=True, image_mode="RGB", type="numpy",
                                  format="png", layers=False, transforms=(),
                                  brush=gr.Brush(colors=colours, default_color=colours[0], color_mode="defaults",
                                                 default_size=max(1, size // side // 2)),
                                  label="canvas", show_label=False, elem_id="igpt-canvas", elem_classes="pixels")
            use_canvas = gr.Button("Use this drawing", elem_id="igpt-use-drawing")
    return pictures, test_choice, upload, canvas, use_canvas


def _cut_view(worker: ModelWorker, gallery: Gallery) -> tuple:
    """The chosen picture as the model sees it, cut where the kept rows end, and the slider that moves the cut."""
    import gradio as gr

    keep_rows = worker.side // 2
    start = None if gallery.images is None else cut_preview(worker.seen(gallery.images[0]), keep_rows)
    gr.Markdown("**The picture as the model sees it**: below the red line is hidden")
    preview = gr.Image(start, label="chosen picture", show_label=False, format="png", interactive=False,
                       elem_classes="pixels", elem_id="igpt-preview")
    return preview, gr.Slider(0, worker.side, value=keep_rows, step=1, label="rows to keep")


def _surprise_view(worker: ModelWorker, gallery: Gallery, folder: Path):
    """The surprise map, drawn at first for the first test picture."""
    import gradio as gr

    first = None
    if gallery.images is not None:
        start = gallery.images[0]
        first = surprise_picture(start, worker.pixel_bits(start), gallery.captions[0], folder)
    gr.Markdown("**Surprise map**: the bits each pixel costs the model, given the pixels before it")
    return gr.Image(first, label="surprise map", show_label=False, format="png", interactive=False,
                    elem_id="igpt-surprise")


def _sampling_options(worker: ModelWorker) -> list:
    """Temperature, top-k, top-p, the number of completions and the seed, in the order `complete` takes them."""
    import gradio as gr

    return [gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="temperature"),
            gr.Slider(0, worker.palette.size, value=0, step=1, label="top-k (0: off)"),
            gr.Slider(0.05, 1.0, value=1.0, step=0.01, label="top-p (1: off)"),
            gr.Slider(1, MAX_COMPLETIONS, value=4, step=1, label="completions"),
            gr.Number(-1, precision=0, minimum=-1, label="seed (-1: a new one each time)", elem_id="igpt-seed")]


def _shown(message: str) -> Exception:
    """A message the page shows in place of a traceback."""
    import gradio as gr

    return gr.Error(html.escape(message), print_exception=False)


class _Handlers:
    """What the page's events run. `chosen` (a gr.State) holds the chosen picture and its name; every
    IgptError a user's input raises is shown on the page. `complete` streams the grid after every
    decoded row, then the finished grid and its PNG. (No docstrings on the methods: Gradio would show
    them as the API's descriptions.)"""

    def __init__(self, worker: ModelWorker, gallery: Gallery, folder: Path, max_upload_bytes: int):
        self.worker, self.gallery, self.folder, self.max_upload_bytes = worker, gallery, folder, max_upload_bytes

    def _chose(self, image: np.ndarray, name: str, keep_rows, message: str):
        return {"image": image, "name": name}, cut_preview(self.worker.seen(image), int(keep_rows)), message

    def pick_test(self, index, keep_rows):
        gallery = self.gallery
        if index is None or gallery.images is None:
            raise _shown("this run has no test pictures: upload or draw one")
        return self._chose(gallery.images[int(index)], gallery.captions[int(index)], keep_rows,
                           f"Chosen: {gallery.captions[int(index)]}.")

    def use_upload(self, path, keep_rows):
        if path is None:
            raise _shown("no file arrived: upload an image file")
        side = self.worker.side
        try:
            image, name = read_upload(path, side, self.max_upload_bytes)
        except IgptError as err:
            raise _shown(str(err)) from None
        return self._chose(image, name, keep_rows, f"Chosen: {html.escape(name)}, centre-cropped and resized to "
                                                   f"{side}x{side}.")

    def use_drawing(self, value, keep_rows):
        side = self.worker.side
        try:
            image = read_drawing(value, side)
        except IgptError as err:
            raise _shown(str(err)) from None
        return self._chose(image, "drawing", keep_rows, f"Chosen: your drawing, at {side}x{side}.")

    def cut(self, chosen, keep_rows):
        import gradio as gr

        return gr.skip() if chosen is None else cut_preview(self.worker.seen(chosen["image"]), int(keep_rows))

    def surprise(self, chosen):
        if chosen is None:
            raise _shown("choose, upload or draw a picture first")
        bits = self.worker.pixel_bits(chosen["image"])
        return surprise_picture(chosen["image"], bits, chosen["name"], self.folder)

    def complete(self, chosen, keep_rows, temperature, top_k, top_p, samples, seed):
        import gradio as gr

        if chosen is None:
            raise _shown("choose, upload or draw a picture first")
        side = self.worker.side
        seed = secrets.randbelow(2**31) if seed is None or int(seed) < 0 else int(seed)
        keep_rows, samples = int(keep_rows), int(samples)
        frames = self.worker.complete(chosen["image"], keep_rows, samples, temperature=float(temperature),
                                      top_k=int(top_k) or None, top_p=None if float(top_p) >= 1 else float(top_p),
                                      seed=seed)
        grids = self.folder / uuid.uuid4().hex
        try:
            with contextlib.closing(frames):
                for frame in frames:
                    shown = frame.grid.repeat(2, 0).repeat(2, 1)  # twice the saved grid's size: easier to see
                    if frame.rows is None:
                        yield shown, f"Completing: row {frame.filled_rows} of {side}...", gr.skip()
                        continue
                    path = save_grid(frame.rows, grids / f"igpt-completions-seed{seed}.png", columns=samples + 2)
                    yield (shown, f"{samples} completion{'s' * (samples > 1)} of {html.escape(chosen['name'])} "
                           f"from its top {keep_rows} of {side} rows (seed {seed}): first the input, last the "
                           "original.", str(path))
        except IgptError as err:
            raise _shown(str(err)) from None
        finally:
            shutil.rmtree(grids, ignore_errors=True)  # Gradio has copied the grid into its own cache by now


def serve(ckpt: str | os.PathLike, *, host: str = "127.0.0.1", port: int = 7860, device: str | None = None,
          precision: str = "fp32", max_upload_mb: float = MAX_UPLOAD_MB, data: dict | None = None,
          log: Callable[[str], None] = print) -> None:
    """Serve the page for the run at `ckpt` until Ctrl-C or SIGTERM.

    Everything the page writes (uploads, drawings, grids, Gradio's cache) goes into one temporary
    folder, removed at exit. `data` (DataConfig fields) names the test pictures where the run
    does not record them.
    """
    require_gradio()
    if max_upload_mb <= 0:
        raise IgptError(f"--max-upload-mb must be positive, got {max_upload_mb}")
    from igpt.checkpoint import load_run

    stop = threading.Event()
    folder = Path(tempfile.mkdtemp(prefix="igpt-serve-"))
    handlers = _stop_on_signals(stop)
    previous_tempdir = tempfile.tempdir
    try:
        os.environ["GRADIO_TEMP_DIR"] = str(folder / "gradio")  # read when Gradio is imported and as it serves
        os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # a local page does not report to anyone
        os.environ["GRADIO_RUN_HISTORY"] = "False"  # nor keeps its users' inputs in their browsers
        tempfile.tempdir = str(folder)  # what Gradio writes without asking its own setting
        model, palette, info = load_run(ckpt, device)
        worker = ModelWorker(model, palette, precision)
        data_name, gallery = first_test_pictures(info, model.config, data)
        if gallery.note:
            log(f"igpt serve: {gallery.note}")
        exposed = None
        if not is_loopback(host):
            exposed = (f"**Reachable from other machines**: this page is served on {html.escape(host)}:{port}, so "
                       "anyone who can reach this machine can use it. Leave out --host to serve this machine only.")
        app = build_app(worker, model_facts(worker, ckpt, data_name), gallery, folder=folder / "work",
                        max_upload_bytes=int(max_upload_mb * 2**20), exposed=exposed)
        app.queue(max_size=64, default_concurrency_limit=4)
        try:
            app.launch(server_name=host, server_port=port, prevent_thread_lock=True, quiet=True, share=False,
                       max_file_size=int(max_upload_mb * 2**20), ssr_mode=False, mcp_server=False,
                       enable_monitoring=False, footer_links=["api", "settings"], css=CSS)
        except OSError:  # Gradio's message speaks of its own settings, not of igpt's flags
            raise IgptError(f"cannot serve on {host}:{port}: the port is in use, or the address is not one of this "
                            "machine's; choose another --port or --host") from None
        shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        log(f"igpt serve: http://{shown}:{port} (Ctrl-C stops it)"
            + ("; reachable from other machines" if exposed else ""))
        while not stop.wait(0.5):
            pass
        log("igpt serve: stopping")
        worker.close()
        app.close()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        tempfile.tempdir = previous_tempdir
        shutil.rmtree(folder, ignore_errors=True)


def _stop_on_signals(stop: threading.Event) -> dict:
    """Ctrl-C and SIGTERM set `stop`, so the server closes and its folder is removed; the old handlers are returned."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    handlers = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        handlers[signum] = signal.signal(signum, lambda *_: stop.set())
    return handlers
