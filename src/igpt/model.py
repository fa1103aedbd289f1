"""The Image GPT network (docs/reference.md §3-4), exact to the released weights.

A GPT-2-style decoder over colour tokens: gain-only RMS norm, quick GELU, no biases, learned
positions, a learned start-of-sequence vector, an untied zero-initialised head. One set of
weights serves two objectives: `ar` (causal, next pixel) and `bert` (bidirectional, masked pixels).

Beyond the paper (docs/reference.md §9.5-9.6), two configuration fields whose defaults are the
paper: `positions` "2d" (a learned row table plus a learned column table) and `attention`
"local" (each pixel sees the window_rows x side positions before it) or "strided" (Sparse
Transformer: even layers see the last side positions, odd layers the pixel's own column).

This file is the reference: a block calls `attend` with its layer's pattern, and the
attention package (igpt/attention/) decides how that is computed; the fused element-wise
Functions live in ops.py, file I/O in pretrained.py, decoding's fast path in decoding.py.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from igpt import migrate
from igpt.attention import attend, layer_pattern
from igpt.errors import IgptError, one_of
from igpt.ops import RMSNorm, quick_gelu
from igpt.palette import Palette
from igpt.pretrained import Pretrained

BERT_MASK_RATE = 0.15
OBJECTIVES = ("ar", "bert")
POSITIONS = ("1d", "2d")
ATTENTIONS = ("dense", "local", "strided")
SAVED_EXTRAS = {"model_type"}  # written beside the fields in config.json

PRESETS = {
    "tiny": dict(n_layer=4, n_embd=128, n_head=4),
    "mini": dict(n_layer=8, n_embd=256, n_head=8),
    "igpt-s": dict(n_layer=24, n_embd=512, n_head=8),
    "igpt-m": dict(n_layer=36, n_embd=1024, n_head=8),
    "igpt-l": dict(n_layer=48, n_embd=1536, n_head=16),
    "igpt-xl": dict(n_layer=60, n_embd=3072, n_head=16),
}


@dataclass
class ImageGPTConfig:
    vocab_size: int = 512  # palette size
    n_ctx: int = 1024  # pixels per image: resolution squared
    n_embd: int = 512
    n_layer: int = 24
    n_head: int = 8
    objective: str = "ar"  # "ar" or "bert"
    bias: bool = False  # linear-layer biases: only for Hugging Face models that carry non-zero ones
    eps: float = 1e-5
    n_classes: int = 0  # a classifier head on the mean-pooled final norm (fine-tuning)
    positions: str = "1d"  # "1d": one learned vector per position; "2d": a row vector plus a column vector
    attention: str = "dense"  # "dense" (the paper), "local" or "strided"
    window_rows: int = 2  # local attention: image rows of earlier pixels each pixel sees

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value, kind = getattr(self, field.name), type(field.default)
            allowed = (int, float) if kind is float else (kind,)
            if not isinstance(value, allowed) or (isinstance(value, bool) and kind is not bool):
                raise IgptError(f"invalid model configuration: {field.name} must be {kind.__name__}, got {value!r}")
        self.eps = float(self.eps)
        checks = [
            (self.vocab_size >= 1, "vocab_size must be >= 1"),
            (self.n_ctx >= 1, "n_ctx must be >= 1"),
            (self.n_layer >= 1, "n_layer must be >= 1"),
            (self.n_head >= 1 and self.n_embd % self.n_head == 0,
             f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})"),
            (self.objective in OBJECTIVES, f"objective must be {one_of(OBJECTIVES)}, got {self.objective!r}"),
            (self.eps > 0, "eps must be > 0"),
            (self.n_classes >= 0, "n_classes must be >= 0"),
            (self.positions in POSITIONS, f"positions must be {one_of(POSITIONS)}, got {self.positions!r}"),
            (self.attention in ATTENTIONS,
             f"attention must be {one_of(ATTENTIONS)}, got {self.attention!r}"),
            (self.window_rows >= 1, "window_rows must be >= 1"),
            (self.objective == "ar" or self.attention == "dense",
             f"the bert objective sees every pixel, so it needs attention 'dense', not {self.attention!r}"),
            (self.is_paper or self.n_ctx >= 1 and math.isqrt(self.n_ctx) ** 2 == self.n_ctx,
             f"positions {self.positions!r} with attention {self.attention!r} need a square image, "
             f"but n_ctx {self.n_ctx} is not a square"),
        ]
        for ok, message in checks:
            if not ok:
                raise IgptError(f"invalid model configuration: {message}")

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ImageGPTConfig":
        """A named size; context and vocabulary follow the data, so pass them (and any other field) as overrides."""
        if name not in PRESETS:
            raise IgptError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
        cls._reject_unknown(overrides)
        return cls(**{**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "ImageGPTConfig":
        """A saved configuration: every field must be present, so a file never silently takes a default
        (igpt 0.1's files, which lacked some, are migrated first)."""
        values = migrate.model_config(values)
        cls._reject_unknown(values, allowed=SAVED_EXTRAS)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values]
        if missing:
            raise IgptError(f"model configuration lacks fields: {', '.join(missing)}")
        return cls(**{k: v for k, v in values.items() if k not in SAVED_EXTRAS})

    @classmethod
    def _reject_unknown(cls, values: dict, allowed: set[str] = frozenset()) -> None:
        unknown = sorted(set(values) - {f.name for f in dataclasses.fields(cls)} - allowed)
        if unknown:
            raise IgptError(f"unknown model configuration fields: {', '.join(unknown)} (a config from another "
                            "version of igpt, or a hand edit: upgrade igpt or remove them)")

    def to_dict(self) -> dict:
        return {"model_type": "igpt", **dataclasses.asdict(self)}

    @property
    def side(self) -> int:
        """The image side: the context is side x side pixels in raster order."""
        side = math.isqrt(self.n_ctx)
        if side * side != self.n_ctx:
            raise IgptError(f"the context of {self.n_ctx} pixels is not a square image; the image commands need "
                            "n_ctx = resolution squared")
        return side

    @property
    def is_paper(self) -> bool:
        """The released architecture: 1-D positions and dense attention (what Hugging Face's ImageGPT holds)."""
        return self.positions == "1d" and self.attention == "dense"

    def check_palette(self, palette: Palette, where: str | os.PathLike) -> None:
        """The one check that a palette and this model's vocabulary belong together."""
        if palette.size != self.vocab_size:
            raise IgptError(f"{where}: the palette has {palette.size} colours but the model's vocabulary is "
                            f"{self.vocab_size}; use the palette the model was trained with")


def num_params(config: ImageGPTConfig) -> int:
    """Parameter count from the configuration alone (no allocation): sizes the big presets."""
    d, v = config.n_embd, config.vocab_size
    per_block = 12 * d * d + 2 * d + (9 * d if config.bias else 0)
    classifier = config.n_classes * d
    positions = config.n_ctx if config.positions == "1d" else 2 * config.side
    return config.n_layer * per_block + (2 * v + positions + 2) * d + classifier


def bert_mask(shape: tuple[int, ...], generator: torch.Generator | int | None = None) -> torch.Tensor:
    """The BERT objective's mask: each position independently with probability 0.15 (docs/reference.md §4).

    An int seeds a CPU generator of its own, so every device and process draws the same mask from it.
    """
    if isinstance(generator, int):
        generator = torch.Generator().manual_seed(generator)
    device = generator.device if generator is not None else None
    return torch.rand(shape, generator=generator, device=device) < BERT_MASK_RATE


def token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Each pixel's NLL in nats, (B, n): what `nll` sums, and what the surprise map shows."""
    return F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten(), reduction="none").view(tokens.shape)


def nll(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The generative loss: summed NLL in nats over the predicted pixels, and their number.

    logits[:, i] predicts tokens[:, i] (the sos shift is inside the model); `mask` (bert)
    restricts both to the masked positions. Training, evaluation and fine-tuning all use this
    one function; sums (not means) let gradient accumulation and
    several processes add up to exactly the single-batch mean.
    """
    per_token = token_nll(logits, tokens).flatten()
    if mask is None:
        return per_token.sum(), torch.tensor(per_token.numel(), device=per_token.device)
    weights = mask.flatten().to(per_token.dtype)
    return (per_token * weights).sum(), weights.sum()


class Attention(nn.Module):
    def __init__(self, config: ImageGPTConfig, layer: int):
        super().__init__()
        d = config.n_embd
        self.n_head = config.n_head
        self.pattern = layer_pattern(config, layer)
        self.q = nn.Linear(d, d, bias=config.bias)
        self.k = nn.Linear(d, d, bias=config.bias)
        self.v = nn.Linear(d, d, bias=config.bias)
        self.proj = nn.Linear(d, d, bias=config.bias)

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = torch.cat([self.q.bias, self.k.bias, self.v.bias]) if self.q.bias is not None else None
        return torch.cat([self.q.weight, self.k.weight, self.v.weight]), bias

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        return x.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        # One matrix product for q, k and v: three separate weights, one larger (faster) matmul.
        q, k, v = (self._heads(y) for y in F.linear(x, *self._stacked()).split(d, dim=-1))
        return self.proj(attend(q, k, v, self.pattern).transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(quick_gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, config: ImageGPTConfig, layer: int):
        super().__init__()
        self.ln_1 = RMSNorm(config.n_embd, eps=config.eps)
        self.attn = Attention(config, layer)
        self.ln_2 = RMSNorm(config.n_embd, eps=config.eps)
        self.mlp = MLP(config)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln_1(h))
        return h + self.mlp(self.ln_2(h))


class ImageGPT(Pretrained, nn.Module):
    """`model(tokens)` -> logits (B, n, vocab); logits[:, i] predicts tokens[:, i] (the sos shift is inside)."""

    config_class = ImageGPTConfig

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.config = config
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)
        if config.positions == "1d":
            self.wpe = nn.Parameter(torch.empty(config.n_ctx, d))
        else:
            self.wpe_row = nn.Parameter(torch.empty(config.side, d))
            self.wpe_col = nn.Parameter(torch.empty(config.side, d))
        self.sos = nn.Parameter(torch.empty(d))
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = RMSNorm(d, eps=config.eps)
        self.head = nn.Linear(d, config.vocab_size, bias=False)
        self.classifier = nn.Linear(d, config.n_classes, bias=False) if config.n_classes else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The released initialisation (docs/reference.md §3.2)."""
        d, n_layer = self.config.n_embd, self.config.n_layer
        nn.init.normal_(self.wte.weight, std=0.02)
        for table in self.position_tables():
            nn.init.normal_(table, std=0.01)
        nn.init.normal_(self.sos, std=0.02)
        for block in self.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v):
                nn.init.normal_(lin.weight, std=1 / math.sqrt(d))
            nn.init.normal_(block.attn.proj.weight, std=1 / math.sqrt(d * n_layer))
            nn.init.normal_(block.mlp.fc.weight, std=0.02)
            nn.init.normal_(block.mlp.proj.weight, std=0.02)
            for norm in (block.ln_1, block.ln_2):
                nn.init.ones_(norm.weight)
        nn.init.ones_(self.ln_f.weight)
        nn.init.zeros_(self.head.weight)
        if self.classifier is not None:
            nn.init.zeros_(self.classifier.weight)
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    # ---- the forward pass ----------------------------------------------------------------------
    def position_tables(self) -> list[nn.Parameter]:
        return [self.wpe] if self.config.positions == "1d" else [self.wpe_row, self.wpe_col]

    def positions(self, start: int, stop: int) -> torch.Tensor:
        """The position vectors of input positions start..stop-1 (sos sits at 0), (stop - start, d)."""
        if self.config.positions == "1d":
            return self.wpe[start:stop]
        return self.positions_at(torch.arange(start, stop, device=self.wpe_row.device))

    def positions_at(self, index: torch.Tensor) -> torch.Tensor:
        """The position vectors of the input positions in `index`: wpe[i] (1d), or row i // side plus
        column i % side (2d), so sos at 0 and pixel x_i at i share the layout of 1-D positions."""
        if self.config.positions == "1d":
            return self.wpe.index_select(0, index)
        side = self.config.side
        return self.wpe_row.index_select(0, index // side) + self.wpe_col.index_select(0, index % side)

    def embed(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Input vectors: [sos, e(x_1..x_{n-1})] for ar; e(x) with masked positions zeroed for bert."""
        b, n = tokens.shape
        if n > self.config.n_ctx:
            raise IgptError(f"{n} tokens exceed the model's context of {self.config.n_ctx}")
        if self.config.objective == "ar":
            sos = self.sos.expand(b, 1, -1).to(self.wte.weight.dtype)
            h = torch.cat([sos, self.wte(tokens[:, :-1])], dim=1)
        else:
            h = self.wte(tokens)
            if mask is not None:
                h = h.masked_fill(mask[..., None], 0.0)
        return h + self.positions(0, n)

    def hidden(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The final normalised hidden states (B, n, d)."""
        h = self.embed(tokens, mask)
        for block in self.blocks:
            h = block(h)
        return self.ln_f(h)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None, *, classes: bool = False):
        """Logits (B, n, vocab); with `classes`, also the classifier's logits (B, n_classes) from the same pass.

        One entry point for both, so DDP and FSDP (which hook `forward`) serve fine-tuning too.
        """
        hidden = self.hidden(tokens, mask)
        if not classes:
            return self.head(hidden)
        if self.classifier is None:
            raise IgptError("this model has no classifier head (n_classes is 0)")
        return self.head(hidden), self.classifier(hidden.mean(1))

    def loss(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean NLL in nats/token: every position (ar), or the masked positions (bert).

        bert draws each position's mask with probability 0.15 from `generator` unless `mask` is
        given; a draw that masks nothing gives a zero loss (no NaN) without a data-dependent branch.
        """
        if self.config.objective == "bert" and mask is None:
            mask = bert_mask(tokens.shape, generator).to(tokens.device)
        total, count = nll(self(tokens, mask), tokens, mask)
        return total / count.clamp(min=1)

    def classify(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(generative logits, class logits from the mean-pooled final norm) from one pass."""
        return self(tokens, mask, classes=True)

    def features(self, tokens: torch.Tensor, layers,
                 pool: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """The probe features of docs/reference.md §6.1 from one pass: f_l = mean over positions of norm(h_l).

        h_l is the residual stream after l blocks, normalised by block l+1's first norm
        (what its attention sees); for l = n_layer it is ln_f's output. l runs 0..n_layer.
        `pool` maps a layer's (B, n, d) normalised states to its features (default: the float32
        mean over positions; the probe passes its pooling grids).
        """
        wanted = sorted(set(int(l) for l in layers))
        if not wanted or wanted[0] < 0 or wanted[-1] > self.config.n_layer:
            raise IgptError(f"probe layers must lie in 0..{self.config.n_layer}, got {list(layers)}")
        pool = pool or (lambda x: x.mean(1).float())
        out = {}
        h = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            if i in wanted:
                out[i] = pool(block.ln_1(h))
            if i >= wanted[-1]:
                break
            h = block(h)
        if self.config.n_layer in wanted:
            out[self.config.n_layer] = pool(self.ln_f(h))
        return {l: out[l] for l in wanted}
