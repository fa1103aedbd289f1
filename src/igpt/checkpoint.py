"""Run folders: everything a run needs to be resumed, sampled, probed or shared.

    RUN_DIR/config.json, model.safetensors   the model (what ImageGPT.from_pretrained reads)
    RUN_DIR/palette.npy                      its palette
    RUN_DIR/run.json                         what made it: kind, data description, settings (runrecord.py)
    RUN_DIR/train_state.pt                   step, weights and optimizer state for --resume
    RUN_DIR/metrics.jsonl, events.out.*      the learning curve (metrics.py)
    RUN_DIR/best/                            the model at the best validation loss
    RUN_DIR/samples/                         sample grids written during training
    RUN_DIR/.lock                            the claim of the one process writing the run (runlock.py)

Every file is written atomically. `train_state.pt` carries its own copy of the weights, so
--resume reads one file that is always self-consistent, whichever write a crash interrupted.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path
from typing import Callable

import torch

from igpt.distributed import resolve_device
from igpt.errors import IgptError
from igpt.fileio import atomic_write
from igpt.metrics import LearningCurve
from igpt.model import ImageGPT
from igpt.palette import PALETTE_NAME, Palette
from igpt.runlock import LOCK, RunLock
from igpt.runrecord import RUN_CONFIG, RunInfo, read_record, write_record

TRAIN_STATE = "train_state.pt"
BEST = "best"


class RunFolder:
    """One run's folder: its lock, its learning curve and its checkpoints. `prepare` claims it for this process
    until `close` (also on garbage collection and at exit; the kernel drops the claim if the process dies), so two
    runs never write into one folder. Usable as a context manager that closes on leaving."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.created = False  # prepare made the folder
        self.lock = RunLock(self.path)
        self.curve = LearningCurve(self.path)

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- before training ---------------------------------------------------------------------
    def prepare(self, *, resume: bool, differences: Callable[[dict], list[str]]) -> None:
        """Claim the folder, then refuse, before any work, one that would lose or mix up a previous run.

        The claim comes first, so the checks see a folder no other process is writing into; this
        process's PID goes into the lock once they pass, so a refused run changes nothing.
        """
        if self.path.exists() and not self.path.is_dir():
            raise IgptError(f"--out {self.path} is a file; give a folder for the run")
        nothing_to_resume = f"nothing to resume in {self.path}: it holds no {TRAIN_STATE} and {RUN_CONFIG}"
        if resume and not self.path.is_dir():
            raise IgptError(nothing_to_resume)
        self.created = not self.path.exists()
        self.lock.claim()
        try:
            if resume:
                if not (self.path / TRAIN_STATE).is_file() or not (self.path / RUN_CONFIG).is_file():
                    raise IgptError(nothing_to_resume)
                diff = differences(self.run_config())
                if diff:
                    raise IgptError("--resume with a different configuration: " + "; ".join(diff))
            elif any(entry.name != LOCK for entry in self.path.iterdir()):
                raise IgptError(f"--out {self.path} exists and is not empty: choose a new folder, or pass --resume")
            try:
                probe = self.path / f".write-test-{os.getpid()}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as err:
                raise IgptError(f"cannot write to --out {self.path}: {err.strerror or err}") from None
        except BaseException:
            self.discard_if_empty()
            raise
        self.lock.sign()

    def discard_if_empty(self) -> None:
        """The run failed before writing anything: remove what `prepare` created, and release the folder."""
        self.lock.discard()
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            with contextlib.suppress(OSError):  # another run has just started writing into it
                self.path.rmdir()
        self.close()

    def close(self) -> None:
        """The run has ended: write out and close the TensorBoard file, and release the folder."""
        self.curve.close()
        self.lock.release()

    # ---- reading ------------------------------------------------------------------------------
    def run_config(self) -> dict:
        """run.json, in today's layout."""
        return read_record(self.path)

    def palette(self) -> Palette:
        if not (self.path / PALETTE_NAME).is_file() and not (self.path / "preprocessor_config.json").is_file():
            raise IgptError(f"{self.path} has no palette ({PALETTE_NAME}): not a run folder, or an incomplete one")
        return Palette.load(self.path)

    def train_state(self) -> dict:
        path = self.path / TRAIN_STATE
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for damaged or unsafe files
            raise IgptError(f"{path} cannot be loaded safely ({type(err).__name__}); the run cannot resume") from None

    def saved_step(self) -> int:
        path = self.path / TRAIN_STATE
        return self.train_state()["step"] if path.is_file() else 0

    def metrics(self) -> list[dict]:
        return self.curve.read()

    # ---- writing ------------------------------------------------------------------------------
    def save(self, model, palette: Palette, run: dict, state: dict) -> None:
        """A checkpoint: resume state first (it carries its own weights), then the inference files and run.json."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        self.curve.flush()  # the curve up to this checkpoint survives a kill, as metrics.jsonl does
        atomic_write(self.path / TRAIN_STATE, lambda f: f.write(buffer.getbuffer()))
        self.save_model(self.path, model, palette, state["model"])
        write_record(self.path, {**run, "palette_hash": palette.hash})

    def save_best(self, model, palette: Palette, model_state: dict) -> None:
        self.save_model(self.path / BEST, model, palette, model_state)

    @staticmethod
    def save_model(directory: Path, model, palette: Palette, state: dict | None) -> None:
        model.save_pretrained(directory, state_dict=state)
        if not (directory / PALETTE_NAME).is_file() or Palette.load(directory / PALETTE_NAME) != palette:
            palette.save(directory / PALETTE_NAME)

    def log_metrics(self, record: dict) -> None:
        self.curve.log(record)

    def trim_metrics(self, step: int) -> None:
        """On resume, drop the curve past the checkpoint at `step`: those steps are logged again."""
        self.curve.trim(step)


def load_run(path: str | os.PathLike, device: str | None = None) -> tuple[ImageGPT, Palette, RunInfo]:
    """A trained (or imported) model, its palette and its RunInfo, from a run folder."""
    folder = RunFolder(path)
    model = ImageGPT.from_pretrained(folder.path)
    palette = folder.palette()
    model.config.check_palette(palette, folder.path)
    model.config.side  # raises for a context that is not a square image, which every image command needs
    return model.to(resolve_device(device)), palette, RunInfo.read(folder.path)
