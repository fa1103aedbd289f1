"""Run folders: everything a run needs to be resumed, sampled, probed or shared.

    RUN_DIR/config.json, model.safetensors   the model (what ImageGPT.from_pretrained reads)
    RUN_DIR/palette.npy                      its palette
    RUN_DIR/run.json                         what made it: kind, data description, settings (RunInfo)
    RUN_DIR/train_state.pt                   step, weights and optimizer state for --resume
    RUN_DIR/metrics.jsonl, events.out.*      the learning curve (JSON lines, TensorBoard)
    RUN_DIR/best/                            the model at the best validation loss
    RUN_DIR/samples/                         sample grids written during training
    RUN_DIR/.lock                            flock-ed by the one process writing the run, holds its PID

Every file is written atomically. `train_state.pt` carries its own copy of the weights, so
--resume reads one file that is always self-consistent, whichever write a crash interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import io
import json
import logging
import os
import re
import sys
import time
import weakref
from pathlib import Path
from typing import Callable

import torch

from igpt.data import DataConfig
from igpt.distributed import resolve_device
from igpt.errors import IgptError
from igpt.fileio import atomic_write, atomic_write_json, atomic_write_text
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.palette import PALETTE_NAME, Palette

TRAIN_STATE = "train_state.pt"
RUN_CONFIG = "run.json"
BEST = "best"
METRICS = "metrics.jsonl"
EVENT_FILE_SECOND = re.compile(r"events\.out\.tfevents\.(\d{10})\.")  # TensorBoard: the second a file was opened
LOCK = ".lock"

_log = logging.getLogger(__name__)


class RunFolder:
    """One run's folder. `prepare` claims it for this process until `close` (also on garbage
    collection and at exit; the kernel drops the claim if the process dies), so two runs never
    write into one folder. Usable as a context manager that closes on leaving."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.created = False  # prepare made the folder
        self._lock = None  # finalizer closing the locked descriptor of RUN_DIR/.lock
        self._lock_is_new = False  # no earlier run had written into RUN_DIR/.lock
        self._tensorboard = None
        self._tensorboard_closer = None
        self._tensorboard_missing = False
        self._purge_from = None  # on resume, TensorBoard hides the events past the checkpoint

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- before training ---------------------------------------------------------------------
    def prepare(self, *, resume: bool, differences: Callable[[dict], list[str]]) -> None:
        """Claim the folder, then refuse, before any work, one that would lose or mix up a previous run.

        The claim comes first, so the checks see a folder no other process is writing into; this
        process's PID goes into RUN_DIR/.lock once they pass, so a refused run changes nothing.
        """
        if self.path.exists() and not self.path.is_dir():
            raise IgptError(f"--out {self.path} is a file; give a folder for the run")
        nothing_to_resume = f"nothing to resume in {self.path}: it holds no {TRAIN_STATE} and {RUN_CONFIG}"
        if resume and not self.path.is_dir():
            raise IgptError(nothing_to_resume)
        self.created = not self.path.exists()
        fd = self._claim()
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
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n{_command()}\n".encode())

    def _claim(self) -> int:
        """Make the folder and hold an exclusive flock on RUN_DIR/.lock; returns its descriptor.

        A lock file that a failed run removed after we opened it is no claim, so that case tries again.
        """
        path = self.path / LOCK
        while True:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise IgptError(f"cannot write to --out {self.path}: {err.strerror or err}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise IgptError(f"--out {self.path} is in use by {self._holder()}; "
                                "wait for it to finish or choose another folder") from None
            try:
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self._lock_is_new = os.fstat(fd).st_size == 0
        self._lock = weakref.finalize(self, os.close, fd)
        return fd

    def _holder(self) -> str:
        """The process holding the lock, from the PID it writes once it has checked the folder."""
        for _ in range(20):  # the holder may still be checking the folder, before writing its PID
            try:
                pid, _, command = (self.path / LOCK).read_text(errors="replace").partition("\n")
            except OSError:
                break
            if pid.strip().isdigit() and _alive(int(pid)):
                return f"process {pid.strip()}" + (f" ({command.strip()})" if command.strip() else "")
            time.sleep(0.05)
        return "another process"

    def discard_if_empty(self) -> None:
        """The run failed before writing anything: remove what `prepare` created, and release the folder."""
        if self._lock is not None and self._lock_is_new:
            (self.path / LOCK).unlink(missing_ok=True)  # while still locked, so no other run holds this file
        if self.created and self.path.is_dir() and not any(self.path.iterdir()):
            with contextlib.suppress(OSError):  # another run has just started writing into it
                self.path.rmdir()
        self.close()

    def close(self) -> None:
        """The run has ended: write out and close the TensorBoard file, and release the folder."""
        if self._tensorboard_closer is not None:
            self._tensorboard_closer()
            self._tensorboard = self._tensorboard_closer = None
        if self._lock is not None:
            self._lock()
            self._lock = None

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
    def save(self, model, palette: Palette, run: dict, state: dict) -> None:
        """A checkpoint: resume state first (it carries its own weights), then the inference files and run.json."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        if self._tensorboard is not None:
            self._tensorboard.flush()  # the curve up to this checkpoint survives a kill, as metrics.jsonl does
        atomic_write(self.path / TRAIN_STATE, lambda f: f.write(buffer.getbuffer()))
        self.save_model(self.path, model, palette, state["model"])
        atomic_write_json(self.path / RUN_CONFIG, {**run, "palette_hash": palette.hash})

    def save_best(self, model, palette: Palette, model_state: dict) -> None:
        self.save_model(self.path / BEST, model, palette, model_state)

    @staticmethod
    def save_model(directory: Path, model, palette: Palette, state: dict | None) -> None:
        model.save_pretrained(directory, state_dict=state)
        if not (directory / PALETTE_NAME).is_file() or Palette.load(directory / PALETTE_NAME) != palette:
            palette.save(directory / PALETTE_NAME)

    # ---- metrics ------------------------------------------------------------------------------
    def log_metrics(self, record: dict) -> None:
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard_writer()
        if writer is not None:
            for tag, value in record.items():
                if tag != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(tag, value, global_step=record["step"])

    def _tensorboard_writer(self):
        """The event file writer, opened on first use; None (said once) without the tensorboard package."""
        if self._tensorboard is None and not self._tensorboard_missing:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self._tensorboard_missing = True
                _log.warning("igpt: no TensorBoard event files for this run; pip install 'igpt[tensorboard]' "
                             "enables them (metrics.jsonl has the same numbers)")
                return None
            if self._purge_from is not None:
                self._wait_to_sort_after_earlier_event_files()
            self._tensorboard = SummaryWriter(self.path, purge_step=self._purge_from)
            self._tensorboard_closer = weakref.finalize(self, self._tensorboard.close)
        return self._tensorboard

    def _wait_to_sort_after_earlier_event_files(self) -> None:
        """TensorBoard reads a folder's event files in name order, and a name is the second it was opened, then host,
        PID and a per-process counter. A resumed run's purge only drops the steps read before it, so its file must
        sort after every earlier one: opened in a later second. The wait is for a resume within the same second;
        a file stamped further ahead (another host's clock) is not waited for."""
        stamps = [int(m.group(1)) for p in self.path.glob("events.out.tfevents.*")
                  if (m := EVENT_FILE_SECOND.match(p.name))]
        wait = max(stamps, default=0) + 1 - time.time()
        if 0 < wait <= 2:
            time.sleep(wait)

    def trim_metrics(self, step: int) -> None:
        """On resume, drop records past the checkpoint: they will be logged again."""
        self._purge_from = step + 1 if step else None
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


def _alive(pid: int) -> bool:
    """Whether process `pid` exists (signal 0 asks without sending anything)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def _command() -> str:
    """What this process is, for the message a second run on its folder gets: `igpt train` and the like."""
    main = getattr(sys.modules.get("__main__"), "__spec__", None)
    if Path(sys.argv[0]).name == "igpt" or getattr(main, "name", None) == "igpt.cli":
        return " ".join(["igpt", *sys.argv[1:2]])
    return ""


@dataclasses.dataclass
class RunInfo:
    """run.json, typed: what later commands need to know about the run that made a folder.

    A folder without run.json (an imported model) reads as kind None and no data description.
    """

    kind: str | None = None  # "pretrain" or "finetune"
    data: DataConfig | None = None
    config: dict = dataclasses.field(default_factory=dict)  # the settings of the command that made it
    step: int = 0
    classes: list[str] | None = None
    source: str | None = None  # fine-tuning: the pretrained run

    @classmethod
    def read(cls, path: str | os.PathLike) -> "RunInfo":
        path = Path(path)
        if not (path / RUN_CONFIG).is_file():
            return cls()
        raw = RunFolder(path).run_config()
        if "kind" not in raw:
            return cls._from_first_version(raw)
        data = raw.get("data")
        return cls(kind=raw["kind"], data=DataConfig(**data) if data else None, config=raw.get("config") or {},
                   step=raw.get("step", 0), classes=raw.get("classes"), source=raw.get("source"))

    @classmethod
    def _from_first_version(cls, raw: dict) -> "RunInfo":
        """run.json as igpt 0.1 wrote it: the data fields inside "train" (or "data" as a bare name)."""
        train = raw.get("train") or {}
        name = raw.get("data") if isinstance(raw.get("data"), str) else train.get("data")
        data = None
        if name:
            data = DataConfig(name=name, data_dir=train.get("data_dir"), crop=train.get("crop", False),
                              resolution=train.get("resolution", DataConfig.resolution))
        kind = "finetune" if "finetune" in raw else "pretrain"
        return cls(kind=kind, data=data, config=raw.get("finetune") or train, step=raw.get("step", 0),
                   classes=raw.get("classes"))

    def data_for(self, config: ImageGPTConfig, **given) -> DataConfig:
        """The data a later command reads: the run's description with what the command was told
        (`given`: DataConfig fields), at the model's resolution."""
        if self.data is None and not given.get("name"):
            raise IgptError("this checkpoint does not record its data set: pass --data")
        base = self.data or DataConfig(name=given["name"])
        return base.replace(**given, resolution=config.side)


def load_run(path: str | os.PathLike, device: str | None = None) -> tuple[ImageGPT, Palette, RunInfo]:
    """A trained (or imported) model, its palette and its RunInfo, from a run folder."""
    folder = RunFolder(path)
    model = ImageGPT.from_pretrained(folder.path)
    palette = folder.palette()
    model.config.check_palette(palette, folder.path)
    model.config.side  # raises for a context that is not a square image, which every image command needs
    return model.to(resolve_device(device)), palette, RunInfo.read(folder.path)
