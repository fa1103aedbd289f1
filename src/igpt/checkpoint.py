"""Run folders: everything a run needs to be resumed, sampled, probed or shared.

    RUN_DIR/config.json, model.safetensors   the model (what ImageGPT.from_pretrained reads)
    RUN_DIR/palette.npy                      its palette
    RUN_DIR/run.json                         the training configuration and data description
    RUN_DIR/train_state.pt                   step, weights and optimizer state for --resume
    RUN_DIR/metrics.jsonl, events.out.*      the learning curve (JSON lines, TensorBoard)
    RUN_DIR/best/                            the model at the best validation loss
    RUN_DIR/samples/                         sample grids written during training

Every file is written atomically. `train_state.pt` carries its own copy of the weights, so
--resume reads one file that is always self-consistent, whichever write a crash interrupted.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
from pathlib import Path

import torch

from igpt.errors import IgptError
from igpt.fileio import atomic_write, atomic_write_json, atomic_write_text
from igpt.palette import PALETTE_NAME, Palette

TRAIN_STATE = "train_state.pt"
RUN_CONFIG = "run.json"
METRICS = "metrics.jsonl"


class RunFolder:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tensorboard = None

    # ---- before training ---------------------------------------------------------------------
    def prepare(self, *, resume: bool, config, differences, resumable: bool = True) -> None:
        """Refuse, before any work, a folder that would lose or mix up a previous run."""
        if self.path.exists() and not self.path.is_dir():
            raise IgptError(f"--out {self.path} is a file; give a folder for the run")
        if resume:
            if not (self.path / TRAIN_STATE).is_file() or not (self.path / RUN_CONFIG).is_file():
                raise IgptError(f"nothing to resume in {self.path}: it holds no {TRAIN_STATE} and {RUN_CONFIG}")
            saved = self.run_config().get("train", {})
            diff = differences(saved, config)
            if diff:
                raise IgptError("--resume with a different configuration: " + "; ".join(diff))
        elif self.path.is_dir() and any(self.path.iterdir()):
            hint = ", or pass --resume" if resumable else ""
            raise IgptError(f"--out {self.path} exists and is not empty: choose a new folder{hint}")
        self.created = not self.path.exists()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise IgptError(f"cannot write to --out {self.path}: {err.strerror or err}") from None

    def discard_if_empty(self) -> None:
        """Remove the folder `prepare` created when the run failed before writing anything."""
        if getattr(self, "created", False) and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()

    def run_config(self) -> dict:
        try:
            return json.loads((self.path / RUN_CONFIG).read_text())
        except (OSError, ValueError) as err:
            raise IgptError(f"{self.path / RUN_CONFIG} is unreadable ({err}); the run folder is damaged") from None

    # ---- reading ------------------------------------------------------------------------------
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

    # ---- writing ------------------------------------------------------------------------------
    def save(self, model, palette: Palette, config, model_state: dict, optimizer_state: dict, step: int,
             best_val: float) -> None:
        """A checkpoint: resume state first, then the inference files (each write atomic)."""
        state = {"step": step, "best_val": best_val, "model": model_state, "optimizer": optimizer_state}
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(self.path / TRAIN_STATE, lambda f: f.write(buffer.getbuffer()))
        self.save_model(self.path, model, palette, model_state)
        run = {"train": dataclasses.asdict(config), "step": step, "best_val_loss": best_val, "palette_hash": palette.hash}
        atomic_write_json(self.path / RUN_CONFIG, run)

    def save_best(self, model, palette: Palette, model_state: dict) -> None:
        self.save_model(self.path / "best", model, palette, model_state)

    @staticmethod
    def save_model(directory: Path, model, palette: Palette, state: dict | None) -> None:
        model.save_pretrained(directory, state_dict=state)
        if not (directory / PALETTE_NAME).is_file() or Palette.load(directory / PALETTE_NAME) != palette:
            palette.save(directory / PALETTE_NAME)

    # ---- metrics ------------------------------------------------------------------------------
    def log_metrics(self, record: dict) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            from igpt.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(self.path)
        scalars = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        self._tensorboard.add_scalars(record["step"], scalars)

    def trim_metrics(self, step: int) -> None:
        """On resume, drop records past the checkpoint: they will be logged again."""
        path = self.path / METRICS
        if not path.is_file():
            return
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        kept = []
        for line in lines:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (ValueError, KeyError):
                continue  # a line cut short by a kill
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(k + "\n" for k in kept))

    def metrics(self) -> list[dict]:
        path = self.path / METRICS
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records
