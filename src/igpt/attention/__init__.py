"""Attention for Image GPT: what each pattern lets a pixel see, and the backends that compute it.

    patterns.py      Pattern (dense, band, column): `sees`, the one definition of each; layer_pattern;
                     what a decoding step keeps and reads of it
    backends.py      ATTENTION_BACKENDS (sdpa, blocked, blocked_flash, band_kernel, flex), the rule that
                     picks one (choose_backend) and `attend`, the call a model block makes
    band_kernel.py   igpt's C++ band kernel (band_kernel.cpp) as PyTorch custom operators
"""

from igpt.attention.backends import (ATTENTION_BACKENDS, PREFERENCE, attend, band_attention, choose_backend,
                                     column_attention)
from igpt.attention.patterns import Pattern, layer_pattern

__all__ = ["ATTENTION_BACKENDS", "PREFERENCE", "Pattern", "attend", "band_attention", "choose_backend",
           "column_attention", "layer_pattern"]
