"""What each attention pattern lets a pixel see, and what a decoding step keeps and reads of it.

`Pattern.sees` is the one definition of each pattern in the library: the blocked backends'
shared mask, FlexAttention's mask, decoding's chunk mask and the benchmarks' key counts
derive from it (the tests keep masks of their own on purpose, an independent oracle). The
decoding readers sit beside it, since what a step must keep follows from what the pattern
sees: all earlier positions (dense), a ring of the window (band) or the pixel's column (column).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("dense", "band", "column")


@dataclass(frozen=True)
class Pattern:
    """One layer's attention: `dense` (every earlier position, or every position when not causal), `band`
    (the `window` positions up to and including the query's, rows of `side`), `column` (the query's column
    of a `side`-wide image: every `side`-th position back)."""

    kind: str
    side: int = 0
    window: int = 0
    causal: bool = True

    def __post_init__(self):
        if self.kind not in KINDS or (self.kind != "dense" and not (self.causal and self.side >= 1)):
            raise ValueError(f"no attention pattern {self}")
        if self.kind == "band" and not (self.window >= 1 and self.window % self.side == 0):
            raise ValueError(f"a band's window is whole rows of {self.side}, not {self.window} positions")

    def sees(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """Whether position `query` attends to position `key` (broadcasting tensors of positions)."""
        earlier = key <= query
        if self.kind == "dense":
            return earlier if self.causal else torch.ones_like(earlier)
        if self.kind == "band":
            return earlier & (key > query - self.window)
        return earlier & ((query - key) % self.side == 0)

    def mask(self, t: int, device: torch.device | str | None = None) -> torch.Tensor:
        """(t, t): which keys each of t queries sees."""
        position = torch.arange(t, device=device)
        return self.sees(position[:, None], position)

    # ---- decoding: what a one-pixel step keeps and reads ---------------------------------------
    def slots(self, n_ctx: int) -> int:
        """Keys and values a decoding cache keeps: the window's ring for a band, every position otherwise."""
        return min(self.window, n_ctx) if self.kind == "band" else n_ctx

    def keep(self, keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a prefix's (B, heads, t, head_dim) keys and values, fed from position 0, as later steps read them:
        a band keeps its last window, each position p in ring slot p % window."""
        t = k.shape[2]
        if self.kind == "band":
            window = keys.shape[2]
            kept = min(t, window)
            slots = torch.arange(t - kept, t, device=k.device) % window
            keys.index_copy_(2, slots, k[:, :, t - kept :])
            values.index_copy_(2, slots, v[:, :, t - kept :])
        else:
            keys[:, :, :t] = k
            values[:, :, :t] = v

    def read(self, keys: torch.Tensor, values: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             position: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store one pixel's key and value at `position`; return what its query attends to: keys, values, mask.

        `position` as an int reads only the keys written so far (eager steps). As a (1,) tensor it reads the
        whole cache under a mask, so that every step has the same shapes (the static, compilable step); the
        cache must then start zeroed, as masked entries are multiplied by 0.
        """
        if self.kind == "band":
            return self._read_ring(keys, values, k, v, position)
        if isinstance(position, torch.Tensor):
            keys.index_copy_(2, position, k)
            values.index_copy_(2, position, v)
            if self.kind == "dense":
                return keys, values, (torch.arange(keys.shape[2], device=k.device) <= position)[None]
            b, h, n, hd = keys.shape
            column = position % self.side
            keys, values = (x.view(b, h, n // self.side, self.side, hd).index_select(3, column).squeeze(3)
                            for x in (keys, values))
            return keys, values, (torch.arange(n // self.side, device=k.device) <= position // self.side)[None]
        keys[:, :, position : position + 1] = k
        values[:, :, position : position + 1] = v
        if self.kind == "dense":
            return keys[:, :, : position + 1], values[:, :, : position + 1], None
        first = position % self.side
        return keys[:, :, first : position + 1 : self.side], values[:, :, first : position + 1 : self.side], None

    @staticmethod
    def _read_ring(keys, values, k, v, position):
        """A band's ring: the pixel goes to slot p % window, and the ring is read as it lies (attention does not
        care about the order of its keys). The static form masks the slots not yet written until the ring is full."""
        window = keys.shape[2]
        if isinstance(position, torch.Tensor):
            slot = position % window
            keys.index_copy_(2, slot, k)
            values.index_copy_(2, slot, v)
            written = (torch.arange(window, device=k.device) <= position) | (position >= window)
            return keys, values, written[None]
        slot = position % window
        keys[:, :, slot : slot + 1] = k
        values[:, :, slot : slot + 1] = v
        filled = min(position + 1, window)
        return keys[:, :, :filled], values[:, :, :filled], None


def layer_pattern(config, layer: int) -> Pattern:
    """What layer `layer` of a model with this ImageGPTConfig attends to.

    dense: every earlier pixel (every pixel under the bert objective); local: a band of
    window_rows image rows (a wider window is the whole image); strided (Sparse Transformer):
    even layers a band of one row, odd layers the pixel's column.
    """
    if config.attention == "dense":
        return Pattern("dense", causal=config.objective == "ar")
    side = config.side
    if config.attention == "local":
        return Pattern("band", side, min(config.window_rows, side) * side)
    return Pattern("band", side, side) if layer % 2 == 0 else Pattern("column", side)
