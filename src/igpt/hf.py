"""Hugging Face ImageGPT interop: import the released weights, export igpt models.

Hugging Face's `ImageGPTForCausalImageModeling` stores the same network differently:
GPT-2 `Conv1D` weights ([in, out], the transpose of nn.Linear), fused q/k/v, biases
(zero in the released checkpoints), and the start-of-sequence vector as the last row
of a (palette + 1)-row embedding. Its `input_ids` must be [sos] + pixels[:-1].

An exported folder carries a model card (README.md) as models on the hub do: Hugging Face's
metadata block, then what the model is, how well it does and the command that trained it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path
from typing import Callable

import torch

from igpt.checkpoint import BEST
from igpt.config import option
from igpt.data import NAMED
from igpt.errors import IgptError
from igpt.fileio import atomic_write, atomic_write_json, atomic_write_text
from igpt.model import ImageGPT, ImageGPTConfig, num_params
from igpt.palette import HF_CONFIG_NAME, Palette
from igpt.runrecord import RUN_CONFIG, read_record

HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MODEL_CARD = "README.md"
EVAL_RESULT = "eval.json"  # in a run folder: `igpt eval --ckpt RUN --json RUN/eval.json`, or the demo's
CARD_TAGS = ("image-generation", "image-gpt", "igpt")
TASK = "unconditional-image-generation"


@dataclasses.dataclass(kw_only=True)
class ConvertConfig:
    """`igpt convert`'s settings: one direction, and where the converted model goes."""

    from_hf: str | None = option(help="a Hugging Face folder or hub id (openai/imagegpt-small)", metavar="SRC",
                                 exclusive="direction")
    to_hf: str | None = option(help="an igpt run or model folder", metavar="DIR", exclusive="direction")
    out: str = option(help="output folder")
    palette: str | None = option(None, "palette for an import without preprocessor_config.json")


# ---- reading a Hugging Face folder -----------------------------------------------------------
def _resolve(source: str | os.PathLike) -> Path:
    """A local folder, or a hub id (e.g. openai/imagegpt-small) fetched through huggingface_hub."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise IgptError(f"{path} is a file: give the folder that holds config.json and the weights")
        return path
    if str(source).count("/") != 1:
        raise IgptError(f"{source} is neither a folder nor a hub id like openai/imagegpt-small")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise IgptError(f"{source} is not a folder, and fetching it from the hub needs huggingface_hub: "
                        "pip install 'igpt[hub]'") from None
    try:  # one copy of the weights: safetensors when the repository has them, else pytorch_model.bin
        folder = Path(snapshot_download(str(source), allow_patterns=["*.json", "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(str(source), allow_patterns=["*.json", "*.bin"]))
    except Exception as err:  # offline, authentication, no such repository: all mean the same to the user
        message = str(err).splitlines()[0] if str(err) else ""
        raise IgptError(f"cannot fetch {source} from the Hugging Face hub, and it is not a local folder "
                        f"({type(err).__name__}: {message})") from None
    return folder


def _read_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = next((folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if (folder / n).is_file()), None)
    if index is not None:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [n for n in HF_WEIGHTS if (folder / n).is_file()][:1]
    if not files:
        raise IgptError(f"{folder} holds no weights ({' or '.join(HF_WEIGHTS)})")
    state = {}
    for name in files:
        path = folder / name
        try:
            if name.endswith(".safetensors"):
                state.update(load_file(path))
            else:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
        except (SafetensorError, OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
            raise IgptError(f"{path} is damaged, truncated or unsafe to load ({err})") from None
    return state


def _config_from_hf(hf: dict, folder: Path) -> ImageGPTConfig:
    kind = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
    if kind != "imagegpt":
        raise IgptError(f"{folder}/config.json is a {kind!r} model, not a Hugging Face ImageGPT")
    d = hf.get("n_embd", 512)
    unsupported = [
        (hf.get("n_inner") not in (None, 4 * d), "n_inner other than 4 * n_embd"),
        (hf.get("activation_function", "quick_gelu") != "quick_gelu", "an activation other than quick_gelu"),
        (hf.get("scale_attn_by_inverse_layer_idx", False), "scale_attn_by_inverse_layer_idx"),
        (not hf.get("scale_attn_weights", True), "unscaled attention"),
        (hf.get("add_cross_attention", False), "cross-attention"),
    ]
    for bad, what in unsupported:
        if bad:
            raise IgptError(f"{folder} uses {what}, which the released architecture (and igpt) does not have")
    return ImageGPTConfig(vocab_size=hf.get("vocab_size", 513) - 1, n_ctx=hf.get("n_positions", 1024), n_embd=d,
                          n_layer=hf.get("n_layer", 24), n_head=hf.get("n_head", 8),
                          eps=hf.get("layer_norm_epsilon", 1e-5))


def state_from_hf(hf_state: dict[str, torch.Tensor], config: ImageGPTConfig) -> dict[str, torch.Tensor]:
    """Rename and reshape Hugging Face tensors into igpt's layout (biases only when config.bias)."""
    d, v = config.n_embd, config.vocab_size
    t = "transformer."
    try:
        wte = hf_state[t + "wte.weight"]
        out = {"wte.weight": wte[:v], "sos": wte[v], "wpe": hf_state[t + "wpe.weight"][: config.n_ctx],
               "ln_f.weight": hf_state[t + "ln_f.weight"], "head.weight": hf_state["lm_head.weight"]}
        for i in range(config.n_layer):
            h, b = f"{t}h.{i}.", f"blocks.{i}."
            qkv_w, qkv_b = hf_state[h + "attn.c_attn.weight"].T, hf_state[h + "attn.c_attn.bias"]
            pieces = {
                "attn.q": (qkv_w[:d], qkv_b[:d]), "attn.k": (qkv_w[d : 2 * d], qkv_b[d : 2 * d]),
                "attn.v": (qkv_w[2 * d :], qkv_b[2 * d :]),
                "attn.proj": (hf_state[h + "attn.c_proj.weight"].T, hf_state[h + "attn.c_proj.bias"]),
                "mlp.fc": (hf_state[h + "mlp.c_fc.weight"].T, hf_state[h + "mlp.c_fc.bias"]),
                "mlp.proj": (hf_state[h + "mlp.c_proj.weight"].T, hf_state[h + "mlp.c_proj.bias"]),
            }
            for name, (weight, bias) in pieces.items():
                out[f"{b}{name}.weight"] = weight
                if config.bias:
                    out[f"{b}{name}.bias"] = bias
            out[b + "ln_1.weight"] = hf_state[h + "ln_1.weight"]
            out[b + "ln_2.weight"] = hf_state[h + "ln_2.weight"]
    except KeyError as err:
        raise IgptError(f"the Hugging Face weights lack {err}: not an ImageGPTForCausalImageModeling checkpoint") from None
    return {k: x.contiguous().float() for k, x in out.items()}


def _has_nonzero_biases(hf_state: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(".bias") and x.dtype.is_floating_point and x.ndim == 1 and bool(x.any())
               for k, x in hf_state.items() if ".attn.c_" in k or ".mlp.c_" in k)


def from_hf(source: str | os.PathLike) -> tuple[ImageGPT, Palette | None]:
    """An igpt model (and the palette, when the folder has preprocessor_config.json) from Hugging Face."""
    folder = _resolve(source)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise IgptError(f"{folder} has no config.json: not a Hugging Face model folder")
    try:
        hf_config = json.loads(config_path.read_text())
    except ValueError as err:
        raise IgptError(f"{config_path} is not valid JSON ({err})") from None
    config = _config_from_hf(hf_config, folder)
    hf_state = _read_state(folder)
    config = dataclasses.replace(config, bias=_has_nonzero_biases(hf_state))
    model = ImageGPT.from_state_dict(config, state_from_hf(hf_state, config), source=str(folder))
    palette = Palette.load(folder / HF_CONFIG_NAME) if (folder / HF_CONFIG_NAME).is_file() else None
    if palette is not None:
        config.check_palette(palette, folder)
    return model, palette


# ---- writing a Hugging Face folder -----------------------------------------------------------
def state_to_hf(model: ImageGPT) -> dict[str, torch.Tensor]:
    config = model.config
    s = {k: x.detach().float().cpu() for k, x in model.state_dict().items()}
    t = "transformer."
    out = {t + "wte.weight": torch.cat([s["wte.weight"], s["sos"][None]]), t + "wpe.weight": s["wpe"],
           t + "ln_f.weight": s["ln_f.weight"], "lm_head.weight": s["head.weight"]}

    def bias(name: str, size: int) -> torch.Tensor:
        return s.get(name + ".bias", torch.zeros(size))

    d = config.n_embd
    for i in range(config.n_layer):
        h, b = f"{t}h.{i}.", f"blocks.{i}."
        out[h + "ln_1.weight"] = s[b + "ln_1.weight"]
        out[h + "ln_2.weight"] = s[b + "ln_2.weight"]
        out[h + "attn.c_attn.weight"] = torch.cat([s[b + f"attn.{x}.weight"] for x in "qkv"]).T
        out[h + "attn.c_attn.bias"] = torch.cat([bias(b + f"attn.{x}", d) for x in "qkv"])
        for ours, theirs, size in (("attn.proj", "attn.c_proj", d), ("mlp.fc", "mlp.c_fc", 4 * d),
                                   ("mlp.proj", "mlp.c_proj", d)):
            out[f"{h}{theirs}.weight"] = s[f"{b}{ours}.weight"].T
            out[f"{h}{theirs}.bias"] = bias(b + ours, size)
    return {k: x.contiguous() for k, x in out.items()}


def hf_config(config: ImageGPTConfig) -> dict:
    return {
        "architectures": ["ImageGPTForCausalImageModeling"], "model_type": "imagegpt",
        "vocab_size": config.vocab_size + 1, "n_positions": config.n_ctx, "n_embd": config.n_embd,
        "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None, "activation_function": "quick_gelu",
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "layer_norm_epsilon": config.eps,
        "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True, "tie_word_embeddings": False,
        "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
    }


def to_hf(model: ImageGPT, palette: Palette, out: str | os.PathLike, card: "ModelCard | None" = None) -> Path:
    """A folder `transformers.ImageGPTForCausalImageModeling` and `ImageGPTImageProcessor` load, with its model
    card (`card`: what is known of the run that made the model)."""
    from safetensors.torch import save

    if model.config.objective != "ar":
        raise IgptError("Hugging Face's ImageGPT is autoregressive only; a bert-objective model cannot be exported")
    if not model.config.is_paper:
        raise IgptError(f"Hugging Face's ImageGPT has 1-D positions and dense attention only; a model with "
                        f"{model.config.positions} positions and {model.config.attention} attention cannot be exported")
    model.config.check_palette(palette, out)
    side = model.config.side  # Hugging Face's image processor needs square images
    out = Path(out)
    payload = save(state_to_hf(model), metadata={"format": "pt"})
    atomic_write(out / "model.safetensors", lambda f: f.write(payload))
    atomic_write_json(out / "config.json", hf_config(model.config))
    palette.save_hf(out, resolution=side)
    atomic_write_text(out / MODEL_CARD, (card or ModelCard()).text(model, palette, out.name))
    return out


# ---- the model card ----------------------------------------------------------------------------
def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclasses.dataclass
class ModelCard:
    """What an exported model's README.md says beyond config.json: the run that made it (run.json), its test
    bits/pixel (eval.json) and the command that trains it again."""

    data: str | None = None
    kind: str | None = None
    steps: int | None = None
    evaluation: dict | None = None
    command: str | None = None

    @classmethod
    def of_run(cls, folder: str | os.PathLike, command_of: Callable[[dict], str | None] | None = None) -> "ModelCard":
        """The card of the model in `folder`, a run folder or its best/ model (whose run.json and eval.json are
        the run's, one folder up); `command_of`: a run.json record's training command."""
        folder = Path(folder)
        run = folder.parent if folder.name == BEST and (folder.parent / RUN_CONFIG).is_file() else folder
        record = read_record(run) if (run / RUN_CONFIG).is_file() else {}
        evaluation = _read_json(run / EVAL_RESULT)
        if evaluation is not None and not isinstance(evaluation.get("bits_per_pixel"), (int, float)):
            evaluation = None
        return cls(data=(record.get("data") or {}).get("name"), kind=record.get("kind"), steps=record.get("step"),
                   evaluation=evaluation, command=command_of(record) if command_of and record else None)

    def metadata(self, config: ImageGPTConfig, palette: Palette, name: str) -> list[str]:
        """Hugging Face's YAML block; every string is JSON-quoted, which YAML reads as written."""
        q = json.dumps
        lines = ["---", "library_name: transformers", f"pipeline_tag: {TASK}", "tags:", *[f"- {t}" for t in CARD_TAGS]]
        if self.data in NAMED:
            lines += ["datasets:", f"- {q(self.data)}"]
        lines += [f"resolution: {config.side}", f"palette_size: {palette.size}"]
        if self.evaluation is not None:
            data, split = Path(self.data or "unknown").name, self.evaluation.get("split", "test")
            lines += ["model-index:", f"- name: {q(name)}", "  results:", f"  - task: {{type: {TASK}}}",
                      f"    dataset: {{name: {q(data)}, type: {q(data)}, split: {q(split)}}}",
                      "    metrics:", f"    - {{type: bits_per_pixel, name: {q(split + ' bits/pixel')}, "
                      f"value: {self.evaluation['bits_per_pixel']:.4f}}}"]
        return lines + ["---"]

    def text(self, model: ImageGPT, palette: Palette, name: str) -> str:
        config = model.config
        facts = [("resolution", f"{config.side}x{config.side} pixels"), ("palette", f"{palette.size} colours"),
                 ("network", f"{config.n_layer} layers, width {config.n_embd}, {config.n_head} heads, "
                             f"{num_params(config):,} parameters"),
                 ("data", self.data), ("training", self.kind and f"{self.kind}, {self.steps or 0:,} steps")]
        if self.evaluation is not None:
            split = self.evaluation.get("split", "test")
            facts.append((f"{split} bits/pixel", f"{self.evaluation['bits_per_pixel']:.3f}"))
        lines = [*self.metadata(config, palette, name), "", f"# {name}", "",
                 "An Image GPT model (generative pretraining from pixels), trained with igpt.", "",
                 "| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in facts if v], "", "## Use", "", "```python",
                 "from transformers import ImageGPTForCausalImageModeling, ImageGPTImageProcessor", "",
                 f'model = ImageGPTForCausalImageModeling.from_pretrained("{name}")',
                 f'processor = ImageGPTImageProcessor.from_pretrained("{name}")', "```", "",
                 f"or `igpt convert --from-hf {name} --out RUN`, then any igpt command on RUN.", ""]
        if self.command:
            lines += ["## Training", "", "```sh", self.command, "```", ""]
        return "\n".join(lines)
