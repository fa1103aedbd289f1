"""Incremental decoding: the cache, the prefix pass and the one-pixel steps against the full forward."""

import pytest
import torch

from conftest import random_model
from igpt import IgptError
from igpt.decoding import Decoder


@torch.no_grad()
@pytest.mark.parametrize("static", [False, True], ids=["eager", "static"])
@pytest.mark.parametrize("bias", [False, True])
def test_cached_decoding_equals_the_full_forward_at_every_position(bias, static):
    model = random_model(bias=bias)
    tokens = torch.randint(0, 13, (3, 25), generator=torch.Generator().manual_seed(1))
    full = model(tokens)
    for prefix in (0, 1, 7):
        decoder = Decoder(model, 3, static=static)
        logits = decoder.feed(tokens[:, :prefix] if prefix else None)
        torch.testing.assert_close(logits, full[:, prefix], atol=1e-4, rtol=0)
        for i in range(prefix, 24):
            logits = decoder.feed(tokens[:, i : i + 1])
            torch.testing.assert_close(logits, full[:, i + 1], atol=1e-4, rtol=0)
        assert decoder.cache.pos == 25 and (not static or int(decoder.cache.index) == 25)
    with pytest.raises(IgptError, match="past the context"):
        decoder.feed(tokens[:, :1])


def test_chunked_step_after_context_is_causal_within_the_chunk():
    model = random_model()
    tokens = torch.randint(0, 13, (2, 25))
    full = model(tokens)
    decoder = Decoder(model, 2)
    decoder.feed(tokens[:, :4])
    torch.testing.assert_close(decoder.feed(tokens[:, 4:9]), full[:, 9], atol=1e-4, rtol=0)


def test_one_token_step_costs_a_context_share_of_a_full_forward():
    from torch.utils.flop_counter import FlopCounterMode

    model = random_model()
    tokens = torch.randint(0, 13, (1, 25))
    with FlopCounterMode(display=False) as full:
        model(tokens)
    decoder = Decoder(model, 1)
    decoder.feed(tokens[:, :23])
    with FlopCounterMode(display=False) as last:
        decoder.feed(tokens[:, 23:24])
    assert last.get_total_flops() <= 1.1 * full.get_total_flops() / 25


def test_cache_follows_autocast_and_cached_decoding_runs_in_bf16():
    model = random_model()
    tokens = torch.randint(0, 13, (2, 25))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        decoder = Decoder(model, 2)
        first = decoder.feed(tokens[:, :5])
        second = decoder.feed(tokens[:, 5:6])
    assert decoder.cache.k[0].dtype == torch.bfloat16 and decoder.cache.pos == 7
    full = model(tokens)
    assert (first.float() - full[:, 5]).abs().max() < 0.1 and (second.float() - full[:, 6]).abs().max() < 0.1
    assert Decoder(model, 1).cache.k[0].dtype == torch.float32


def test_bert_models_have_no_incremental_decoding():
    with pytest.raises(IgptError, match="autoregressive"):
        Decoder(random_model("bert"), 1)
