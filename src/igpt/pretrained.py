"""Model folders: `save_pretrained` and `from_pretrained`, as Hugging Face's models have them.

A folder holds config.json (the configuration's fields), model.safetensors and, when given,
palette.npy. `Pretrained` is a mixin: the model class names its configuration class in
`config_class`, and loading checks every tensor's name and shape against it before use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from igpt.errors import IgptError
from igpt.fileio import atomic_write, atomic_write_json
from igpt.palette import PALETTE_NAME, Palette

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class Pretrained:
    """File I/O for a torch module with a `config` (whose class is `config_class`: to_dict, from_dict, check_palette)."""

    config_class: type

    def save_pretrained(
        self, directory: str | os.PathLike, state_dict: dict | None = None, palette: Palette | None = None
    ) -> Path:
        """`config.json` + `model.safetensors` (+ `palette.npy` when given), each written atomically."""
        from safetensors.torch import save

        directory = Path(directory)
        if palette is not None:
            self.config.check_palette(palette, directory)
        state = state_dict if state_dict is not None else self.state_dict()
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        payload = save(tensors, metadata={"format": "pt"})
        atomic_write(directory / WEIGHTS_NAME, lambda f: f.write(payload))
        atomic_write_json(directory / CONFIG_NAME, self.config.to_dict())
        if palette is not None:
            palette.save(directory / PALETTE_NAME)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                        palette: Palette | None = None):
        """Load a `save_pretrained` folder; its vocabulary must match `palette` (default: the folder's palette.npy)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise IgptError(f"{directory} is not a folder: give a run folder or a save_pretrained folder")
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not config_path.is_file() or not weights_path.is_file():
            hint = " (a Hugging Face model? import it with igpt convert --from-hf)" if config_path.is_file() else ""
            raise IgptError(f"{directory} is not an igpt model: it needs {CONFIG_NAME} and {WEIGHTS_NAME}{hint}")
        try:
            values = json.loads(config_path.read_text())
        except (OSError, ValueError) as err:
            raise IgptError(f"{config_path} is not readable JSON ({err})") from None
        if not isinstance(values, dict) or values.get("model_type", "igpt") != "igpt":
            raise IgptError(
                f"{config_path} describes a {values.get('model_type') if isinstance(values, dict) else 'non'}"
                " model, not igpt; import Hugging Face models with igpt convert --from-hf"
            )
        config = cls.config_class.from_dict(values)
        if palette is None and (directory / PALETTE_NAME).is_file():
            palette = Palette.load(directory / PALETTE_NAME)
        if palette is not None:
            config.check_palette(palette, directory)
        try:
            state = load_file(weights_path, device=str(map_location))
        except (SafetensorError, OSError, ValueError) as err:
            raise IgptError(f"{weights_path} is damaged or truncated ({err}); re-save or re-download it") from None
        return cls.from_state_dict(config, state, source=str(weights_path))

    @classmethod
    def from_state_dict(cls, config, state: dict[str, torch.Tensor], source: str):
        """A model holding exactly `state`, checked name by name and shape by shape against `config`.

        The module is built on the meta device and takes the tensors as they are, so loading
        a large model costs neither a throwaway random initialisation nor a second copy.
        """
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            problems = [f"{what} {names[:3]}" for what, names in
                        (("missing", missing), ("unexpected", unexpected), ("wrong shape for", shapes)) if names]
            raise IgptError(f"{source} does not match its model configuration: {'; '.join(problems)}")
        model.load_state_dict(state, assign=True)
        return model

