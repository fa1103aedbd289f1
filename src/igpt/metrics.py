"""A run's learning curve: RUN_DIR/metrics.jsonl (one JSON record a line) and TensorBoard event files.

metrics.jsonl is what igpt itself reads back (the demo's plot, fine-tuning's best step); the event
files, written when the tensorboard package is installed, hold the same numbers for TensorBoard.
A resumed run drops what was logged past its checkpoint from both, since it logs those steps again.
"""

from __future__ import annotations

import json
import logging
import re
import time
import weakref
from pathlib import Path

from igpt.fileio import atomic_write_text

METRICS = "metrics.jsonl"
EVENT_FILE_SECOND = re.compile(r"events\.out\.tfevents\.(\d{10})\.")  # TensorBoard: the second a file was opened

_log = logging.getLogger(__name__)


class LearningCurve:
    """The metrics logged into `folder`: appended as the run goes, trimmed on resume, read back."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._tensorboard = None
        self._tensorboard_closer = None
        self._tensorboard_missing = False
        self._purge_from = None  # on resume, TensorBoard hides the events past the checkpoint

    def log(self, record: dict) -> None:
        """One record (its "step" and any numbers) onto the curve."""
        with open(self.folder / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._tensorboard_writer()
        if writer is not None:
            for tag, value in record.items():
                if tag != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(tag, value, global_step=record["step"])

    def flush(self) -> None:
        """Write out the event file, so that the curve so far survives a kill, as metrics.jsonl does."""
        if self._tensorboard is not None:
            self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard_closer is not None:
            self._tensorboard_closer()
            self._tensorboard = self._tensorboard_closer = None

    def trim(self, step: int) -> None:
        """On resume, drop records past the checkpoint at `step`: they will be logged again."""
        self._purge_from = step + 1 if step else None
        path = self.folder / METRICS
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

    def read(self) -> list[dict]:
        path = self.folder / METRICS
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

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
            self._tensorboard = SummaryWriter(self.folder, purge_step=self._purge_from)
            self._tensorboard_closer = weakref.finalize(self, self._tensorboard.close)
        return self._tensorboard

    def _wait_to_sort_after_earlier_event_files(self) -> None:
        """TensorBoard reads a folder's event files in name order, and a name is the second it was opened, then host,
        PID and a per-process counter. A resumed run's purge only drops the steps read before it, so its file must
        sort after every earlier one: opened in a later second. The wait is for a resume within the same second;
        a file stamped further ahead (another host's clock) is not waited for."""
        stamps = [int(m.group(1)) for p in self.folder.glob("events.out.tfevents.*")
                  if (m := EVENT_FILE_SECOND.match(p.name))]
        wait = max(stamps, default=0) + 1 - time.time()
        if 0 < wait <= 2:
            time.sleep(wait)
