"""Files written by igpt 0.1, read as igpt 0.2 writes them: every migration of an older folder, in one place.

igpt 0.1 wrote model config.json files without the attention-pattern fields, which then
meant the paper's architecture, and its first run.json files in another layout. Readers pass
what they load through these functions and then see only the current layout.
"""

from __future__ import annotations

# Model configuration fields that igpt 0.1 did not write, with the value its models had (the paper's).
MODEL_FIELDS_ADDED_IN_0_2 = {"positions": "1d", "attention": "dense", "window_rows": 2}
# What a pretraining run.json's attention null meant (written before run.json named the pattern the model has):
# the objective's default of that time, kept here as it was whatever today's default becomes.
ATTENTION_WHEN_NOT_GIVEN = {"ar": "strided", "bert": "dense"}
FIRST_LAYOUT = "igpt 0.1"  # the writer a record in run.json's first layout names: its runs cannot resume


def model_config(values: dict) -> dict:
    """A config.json's fields, with those igpt 0.1 did not write set to what its models had."""
    return {**MODEL_FIELDS_ADDED_IN_0_2, **values}


def run_record(raw: dict) -> dict:
    """A run.json's contents in today's layout: kind, data (DataConfig fields), config (the command's settings),
    step, and for fine-tuning classes and source; a pretraining run's config names its model's pattern fields."""
    record = dict(raw) if "kind" in raw else _first_layout(raw)
    if record["kind"] == "pretrain" and isinstance(record.get("config"), dict):
        config = model_config(record["config"])
        if config["attention"] is None:
            config["attention"] = ATTENTION_WHEN_NOT_GIVEN.get(config.get("objective", "ar"), "dense")
        record["config"] = config
    return record


def _first_layout(raw: dict) -> dict:
    """igpt 0.1's first run.json: the settings under "train" (a fine-tuning's under "finetune", beside its source's
    "train"), the data fields among the source's settings or "data" a bare name. The record says who wrote it."""
    train = raw.get("train") or {}
    name = raw["data"] if isinstance(raw.get("data"), str) else train.get("data")
    data = {"name": name, **{k: train[k] for k in ("data_dir", "crop", "resolution") if k in train}} if name else None
    rest = {k: v for k, v in raw.items() if k not in ("train", "finetune", "data")}
    return {**rest, "kind": "finetune" if "finetune" in raw else "pretrain", "data": data,
            "config": raw.get("finetune") or train, "written_by": FIRST_LAYOUT}
