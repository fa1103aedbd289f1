"""RUN_DIR/run.json: what made a run folder (kind, data description, settings, progress), and RunInfo, its typed view.

Every reader gets the record in today's layout: what an older igpt wrote passes through
igpt.migrate on the way in.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from igpt import migrate
from igpt.data import DataConfig
from igpt.errors import IgptError
from igpt.fileio import atomic_write_json
from igpt.model import ImageGPTConfig

RUN_CONFIG = "run.json"


def read_record(folder: str | os.PathLike) -> dict:
    """The run.json of `folder`, in today's layout."""
    path = Path(folder) / RUN_CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise IgptError(f"{path} is unreadable ({err}); the run folder is damaged") from None
    return migrate.run_record(raw)


def write_record(folder: Path, record: dict) -> None:
    atomic_write_json(folder / RUN_CONFIG, record)


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
        if not (Path(path) / RUN_CONFIG).is_file():
            return cls()
        record = read_record(path)
        data = record.get("data")
        return cls(kind=record["kind"], data=DataConfig(**data) if data else None, config=record.get("config") or {},
                   step=record.get("step", 0), classes=record.get("classes"), source=record.get("source"))

    def data_for(self, config: ImageGPTConfig, **given) -> DataConfig:
        """The data a later command reads, at the model's resolution: the run's description with what the command
        was told (`given`: DataConfig fields), or, for another data set (transfer), that set's own description:
        the run's --data-dir and --crop belonged to the run's data."""
        if self.data is None and not given.get("name"):
            raise IgptError("this checkpoint does not record its data set: pass --data")
        same = self.data is not None and given.get("name", self.data.name) == self.data.name
        base = self.data if same else DataConfig(name=given["name"])
        return base.replace(**given, resolution=config.side)
