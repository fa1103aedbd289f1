"""Sampling: greedy equals full-forward argmax, filters respect their sets, prefixes are kept, CLI."""

import importlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from igpt import IgptError
from igpt.model import ImageGPT, ImageGPTConfig
from igpt.sample import complete, draw, filter_logits, sample


def small_model(objective="ar", bias=False) -> ImageGPT:
    torch.manual_seed(0)
    model = ImageGPT(ImageGPTConfig(vocab_size=11, n_ctx=16, n_embd=32, n_layer=2, n_head=2, objective=objective,
                                    bias=bias))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def test_greedy_sampling_equals_argmax_decoding_with_full_passes():
    model = small_model()
    fast = sample(model, 3, greedy=True)
    slow = torch.zeros(3, 16, dtype=torch.long)
    with torch.no_grad():
        for i in range(16):
            slow[:, i] = model(slow)[:, i].argmax(-1)  # logits at i only see pixels before i
    torch.testing.assert_close(fast, slow)


def test_compiled_sampling_equals_eager_sampling():
    model = small_model()
    prefix = torch.randint(0, 11, (2, 4), generator=torch.Generator().manual_seed(2))
    eager = sample(model, 2, prefix, greedy=True)
    compiled = sample(model, 2, prefix, greedy=True, compile=True)
    torch.testing.assert_close(compiled, eager)
    gen = [torch.Generator().manual_seed(3) for _ in range(2)]
    torch.testing.assert_close(sample(model, 2, generator=gen[0], compile=True), sample(model, 2, generator=gen[1]))


def test_a_watch_sees_every_row_and_changes_no_draw(monkeypatch):
    """Without a watch a kernel call draws past the rows' ends (as many pixels as CALL_SECONDS allows, a row at
    first, one at least); with one it stops at each row's end for it. The seed's numbers are the same however the
    calls fall, so are the images."""
    from igpt.decoding import KERNEL, Decoder

    sampling = importlib.import_module("igpt.sample")  # the module: igpt.sample is also the function's name

    if not KERNEL.available():
        pytest.skip("no C++ compiler builds igpt's decode kernel here")
    model, calls = small_model(), []
    feed_and_draw = Decoder.feed_and_draw

    def counted(self, out, steps, *rest):
        calls.append(steps)
        return feed_and_draw(self, out, steps, *rest)

    monkeypatch.setattr(Decoder, "feed_and_draw", counted)
    monkeypatch.setattr(sampling, "CALL_SECONDS", 1e6)
    alone = sample(model, 3, generator=torch.Generator().manual_seed(4))
    assert calls == [4, 11]  # the first pixel comes from the prefix pass, a row's worth, then the other 11
    seen, calls[:] = [], []
    watched = sample(model, 3, generator=torch.Generator().manual_seed(4),
                     watch=lambda first, tokens, filled: seen.append(filled))
    assert calls == [3, 4, 4, 4] and seen == [0, 4, 8, 12, 16]
    torch.testing.assert_close(watched, alone)
    calls[:] = []
    monkeypatch.setattr(sampling, "CALL_SECONDS", 0.0)  # a step per call after the first row
    one_by_one = sample(model, 3, generator=torch.Generator().manual_seed(4))
    assert calls == [4] + [1] * 11
    torch.testing.assert_close(one_by_one, alone)


def test_tiny_temperature_is_greedy():
    model = small_model()
    gen = torch.Generator().manual_seed(0)
    torch.testing.assert_close(sample(model, 2, temperature=1e-4, generator=gen), sample(model, 2, greedy=True))


def test_a_prefix_of_the_whole_image_comes_back_as_it_is():
    model = small_model()
    prefix = torch.randint(0, 11, (2, 16))
    torch.testing.assert_close(sample(model, 2, prefix), prefix)
    torch.testing.assert_close(complete(model, prefix, keep_rows=4, samples=2)[:, 0], prefix)


def test_prefix_is_kept_and_seeds_reproduce():
    model = small_model()
    prefix = torch.randint(0, 11, (4, 6))
    a = sample(model, 4, prefix, generator=torch.Generator().manual_seed(1), batch_size=3)
    b = sample(model, 4, prefix, generator=torch.Generator().manual_seed(1), batch_size=3)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a[:, :6], prefix)
    out = complete(model, torch.randint(0, 11, (2, 16)), keep_rows=2, samples=3)
    assert out.shape == (2, 3, 16)
    with pytest.raises(IgptError, match="keep-rows must lie in"):
        complete(model, torch.zeros(1, 16, dtype=torch.long), keep_rows=5, samples=1)
    with pytest.raises(IgptError, match="prefix holds 20 tokens"):
        sample(model, 1, torch.zeros(1, 20, dtype=torch.long))


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-20, 20), min_size=2, max_size=30),
    top_k=st.one_of(st.none(), st.integers(1, 40)),
    top_p=st.one_of(st.none(), st.floats(0.01, 1.0)),
    seed=st.integers(0, 2**16),
)
def test_top_k_and_top_p_never_emit_outside_their_set(logits, top_k, top_p, seed):
    x = torch.tensor([logits])
    filtered = filter_logits(x, 1.0, top_k, top_p)
    allowed = torch.isfinite(filtered[0])
    assert allowed.any()
    order = x[0].argsort(descending=True)
    if top_k is not None:  # only the k largest (ties may add equal values)
        assert x[0][allowed].min() >= x[0][order[min(top_k, len(logits)) - 1]]
    if top_p is not None:  # the kept head is the smallest whose mass reaches top_p
        probs = x[0].softmax(-1)
        kept_mass = probs[allowed].sum()
        assert kept_mass >= min(top_p, 1.0) - 1e-5 or top_k is not None
    draws = draw(filtered.softmax(-1).expand(200, -1), torch.Generator().manual_seed(seed))
    assert allowed[draws].all()


def test_draw_follows_the_distribution():
    """draw() inverts the cumulative sum: frequencies match the probabilities, zero-mass entries never appear."""
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.2, 0.3, 0.0]])
    draws = draw(probs.expand(100_000, -1), torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).double() / len(draws)
    assert torch.allclose(freq, probs[0].double(), atol=0.006) and freq[[0, 2, 5]].sum() == 0
    again = draw(probs.expand(100_000, -1), torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


@pytest.mark.parametrize("kwargs, match", [({"temperature": 0}, "temperature"), ({"top_p": 1.5}, "top-p"),
                                           ({"top_p": 0}, "top-p"), ({"top_k": 0}, "top-k")])
def test_bad_sampling_options(kwargs, match):
    with pytest.raises(IgptError, match=match):
        sample(small_model(), 1, **kwargs)


def test_bert_models_cannot_sample():
    with pytest.raises(IgptError, match="autoregressive"):
        sample(small_model("bert"), 1)


def test_sample_and_complete_commands(tiny_run, tmp_path, capsys):
    run_dir = tiny_run
    from igpt.cli import main

    fp32 = ["--precision", "fp32"]  # bf16's steps round differently in each route, and a draw may then differ
    assert main(["sample", "--ckpt", str(run_dir), "--n", "6", "--out", str(tmp_path / "s.png"), "--seed", "3",
                 *fp32]) == 0
    images = np.load(tmp_path / "s.npy")
    assert images.shape == (6, 8, 8, 3) and images.dtype == np.uint8
    assert Image.open(tmp_path / "s.png").size[0] >= 3 * 8 * 8  # enlarged for visibility
    assert main(["sample", "--ckpt", str(run_dir), "--n", "6", "--out", str(tmp_path / "c6.png"), "--seed", "3",
                 "--compile", *fp32]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "c6.npy"), images)  # the compiled step draws the same images
    assert main(["complete", "--ckpt", str(run_dir), "--n", "3", "--samples", "2", "--keep-rows", "4",
                 "--out", str(tmp_path / "c.png")]) == 0
    rows = np.load(tmp_path / "c.npy")
    assert rows.shape == (3, 4, 8, 8, 3)
    np.testing.assert_array_equal(rows[:, 1, :4], rows[:, 0, :4])  # completions keep the top rows
    capsys.readouterr()
    for bad in (["--keep-rows", "9"], ["--top-p", "0"], ["--temperature", "-1"]):
        assert main(["complete", "--ckpt", str(run_dir), "--out", str(tmp_path / "x.png"), *bad]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("igpt: error:")
    assert not (tmp_path / "x.png").exists()
